using System.Numerics;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;

namespace Backprop.Tests.Core;

/// <summary>No input can make Core write out of bounds or allocate without limit: it is an ArgumentException first.</summary>
public class ResourceLimitTests
{
    private static RunSpec Spec(int[] layers, int batch, int chunk, int workers = 1) => Presets.PyTorchMlp with
    {
        Model = new ModelSpec(layers, Activation.Relu, Loss.CrossEntropy),
        BatchSize = batch,
        ChunkSize = chunk,
        Workers = workers,
        Epochs = 1,
    };

    [Fact]
    public void The_spec_that_crashed_with_an_access_violation_is_rejected_with_its_sizes()
    {
        var e = Assert.Throws<ArgumentException>(() => Spec([784, 65536, 10], 32768, 32768).Validate());
        Assert.Equal("layers: [784,65536,10] has 52101130 parameters (198.8 MiB), over the limit of 16777216 (64 MiB, what one message carries)", e.Message);
    }

    [Fact]
    public void Activations_over_the_per_thread_limit_are_rejected_before_anything_is_allocated()
    {
        // 3.2M parameters fit a message; 32768 samples x 4096 units of activations and deltas do not fit 1 GiB.
        var spec = Spec([784, 4096, 10], 32768, 32768);
        var e = Assert.Throws<ArgumentException>(() => spec.Validate());
        Assert.StartsWith("chunk-size 32768 x layers [784,4096,10]: 1.2 GiB of activations and deltas per worker thread, over the 1 GiB limit", e.Message);
        Assert.Throws<ArgumentException>(() => new BatchBackprop(spec.Model, 32768));

        // Under the per-thread limit, but not for 16 threads of one worker.
        var half = Spec([784, 2048, 10], 16384, 16384);
        half.Validate();
        e = Assert.Throws<ArgumentException>(() => half.Validate(threadsPerWorker: 16));
        Assert.Contains("16 threads per worker", e.Message);
        Assert.Contains("over the 4 GiB limit", e.Message);
    }

    [Fact]
    public void Many_chunks_of_a_big_model_are_accepted_since_a_worker_sends_one_reduced_sum()
    {
        // 16 chunks of 1,863,690 parameters: 114 MiB of chunk sums, but a worker reduces them first and sends one
        // vector (a slice per shard), so only the vector has to fit a message.
        var big = Presets.PyTorchMlp with { Model = Presets.PyTorchMlp.Model with { Layers = [784, 1024, 1024, 10] }, BatchSize = 1024, ChunkSize = 64, Workers = 4 };
        big.Validate(threadsPerWorker: 1);
        (Presets.PyTorchMlp with { BatchSize = 1000, ChunkSize = 1 }).Validate();
        Assert.Throws<ArgumentException>(() => (Presets.PyTorchMlp with { Workers = 256 }).Validate(threadsPerWorker: 17));
    }

    private static readonly int[] Boundary = [1, 2, 63, 64, 65, 1000, 32767, 32768, 65535, 65536, 65537, int.MaxValue, 0, -1];
    private static readonly int[] LayerCounts = [0, 1, 2, 3, 4, 16, 17, 18];

    [Fact]
    public void Extreme_sizes_are_rejected_with_a_message_or_planned_within_the_limits()
    {
        var rng = new Rng(20_240_611);
        int Pick(int[] values) => values[rng.NextInt(values.Length)];
        int accepted = 0, rejected = 0, ran = 0;
        for (int i = 0; i < 10_000; i++)
        {
            // Small sizes more often than the boundary list alone would give them, so that many specs pass.
            var layers = Enumerable.Range(0, Pick(LayerCounts)).Select(_ => rng.NextInt(4) == 0 ? Pick(Boundary) : 1 + rng.NextInt(100)).ToArray();
            var spec = Spec(layers, Pick(Boundary), rng.NextInt(2) == 0 ? Pick(Boundary) : 1 + rng.NextInt(64),
                rng.NextInt(2) == 0 ? Pick(Boundary) : 1 + rng.NextInt(8)) with
            {
                Model = new ModelSpec(layers, (Activation)rng.NextInt(3), (Loss)rng.NextInt(2)),
            };
            int threads = 1 + rng.NextInt(512);
            var exact = Exact(spec, threads);
            try
            {
                spec.Validate(threads);
            }
            catch (ArgumentException e)
            {
                Assert.False(string.IsNullOrWhiteSpace(e.Message));
                rejected++;
                continue;
            }
            accepted++;
            Assert.NotNull(exact);
            var (parameters, threadBytes, totalBytes, reductionBytes) = exact.Value;
            Assert.Equal(parameters, spec.Model.ParameterCount);
            Assert.Equal(totalBytes, BatchBackprop.BufferBytes(spec.Model, spec.ChunkSize, threads));
            Assert.True(parameters <= ResourceLimits.MaxParameters);
            Assert.True(threadBytes <= ResourceLimits.MaxThreadBufferBytes);
            Assert.True(totalBytes <= ResourceLimits.MaxWorkerBufferBytes);
            Assert.True(reductionBytes <= 20 * ResourceLimits.MaxMessageBytes);
            Assert.True((long)spec.Workers * threads <= ResourceLimits.MaxTotalThreads);
            if (totalBytes < 64_000_000)
            {
                RunOneChunk(spec.Model, spec.ChunkSize, threads);
                ran++;
            }
        }
        // The generator reaches both sides of every limit often enough to mean something.
        Assert.True(accepted >= 250 && rejected >= 5000 && ran >= 200, $"{accepted} accepted, {rejected} rejected, {ran} ran");
    }

    /// <summary>
    /// What the spec needs, in exact integers, when its sizes are in range (null otherwise): parameters,
    /// bytes of one backprop thread's buffers, of a worker's, and of its reduction's partial sums (⌈log2 chunks⌉
    /// vectors, <see cref="PairwiseSum"/>; a worker sends only their root). Written from
    /// <see cref="BatchBackprop"/>'s buffer list: per thread x, xᵀ, actT[l ≥ 2] (actT[1] when it is the
    /// output), act[1..L-1], deltaT[1..L], 2 scratch rows, a gradient block, a loss per sample; shared
    /// actT[1], two index arrays and the labels. Each float buffer has 15 floats of alignment slack.
    /// </summary>
    private static (long Parameters, long ThreadBytes, long TotalBytes, long ReductionBytes)? Exact(RunSpec spec, int threads)
    {
        int[] s = spec.Model.Layers;
        int chunk = spec.ChunkSize, L = s.Length - 1;
        if (L < 1 || s.Any(n => n < 1 || n > ResourceLimits.MaxLayerWidth) || chunk < 1 || chunk > ResourceLimits.MaxChunkSize
            || spec.BatchSize < chunk || threads > ResourceLimits.MaxThreadsPerWorker)
            return null;
        BigInteger n = chunk, mp = (chunk + 15) / 16 * 16, parameters = 0;
        for (int l = 0; l < L; l++) parameters += (BigInteger)s[l] * s[l + 1] + s[l + 1];
        static BigInteger Pinned(BigInteger floats) => floats.IsZero ? 0 : floats + 15;
        BigInteger floats = Pinned(n * s[0]) + Pinned(s[0] * mp) + Pinned(2 * mp)
            + Pinned(Math.Max(4 * s[..^1].Max(), s[1..].Max()));
        for (int l = L == 1 ? 1 : 2; l <= L; l++) floats += Pinned(s[l] * mp);
        for (int l = 1; l < L; l++) floats += Pinned(n * s[l]);
        for (int l = 1; l <= L; l++) floats += Pinned(s[l] * mp);
        BigInteger thread = 4 * floats + 8 * n, shared = 4 * Pinned(s[1] * mp) + 9 * n;
        long chunks = (spec.BatchSize + chunk - 1L) / chunk;
        BigInteger reduction = (chunks <= 1 ? 0 : 64 - System.Numerics.BitOperations.LeadingZeroCount((ulong)(chunks - 1))) * parameters * 4;
        bool over = parameters > ResourceLimits.MaxParameters || thread > ResourceLimits.MaxThreadBufferBytes
            || shared + threads * thread > ResourceLimits.MaxWorkerBufferBytes;
        return over ? null : ((long)parameters, (long)thread, (long)(shared + threads * thread), (long)reduction);
    }

    /// <summary>One gradient sum over a few synthetic samples: the buffers planned are the buffers the kernels use.</summary>
    private static void RunOneChunk(ModelSpec spec, int maxBatch, int threads)
    {
        // The thread count was checked above; two threads are what this machine can run without spinning idle.
        using var bp = new BatchBackprop(spec, maxBatch, Math.Min(threads, 2));
        int n = Math.Min(maxBatch, 3);
        var input = bp.Input(n);
        for (int i = 0; i < input.Length; i++) input[i] = (i % 7) / 7f;
        var labels = Enumerable.Range(0, n).Select(i => (byte)(i % spec.OutputSize)).ToArray();
        var parameters = Initializer.Create(spec, InitScheme.PyTorch, seed: 1);
        var gradient = new float[parameters.Length];
        double loss = bp.GradientSum(parameters, n, labels, gradient);
        Assert.True(double.IsFinite(loss) && loss > 0, $"loss {loss} of {spec.Describe()}");
        Assert.Equal(loss, bp.Forward(parameters, n, labels));
        // The output biases' gradient is Σ (a − y)(·σ'): never all zero while the outputs are not exactly the labels.
        Assert.Contains(gradient.AsSpan(gradient.Length - spec.OutputSize).ToArray(), g => g != 0);
    }

    [Fact]
    public void The_buffers_allocated_are_the_bytes_planned()
    {
        foreach (var (layers, maxBatch, threads) in new[] { (new[] { 784, 128, 64, 10 }, 64, 1), ([784, 10], 37, 2), ([5, 300, 2], 1000, 3) })
        {
            var spec = new ModelSpec(layers, Activation.Relu, Loss.CrossEntropy);
            long planned = BatchBackprop.BufferBytes(spec, maxBatch, threads);
            long before = GC.GetAllocatedBytesForCurrentThread();
            using var bp = new BatchBackprop(spec, maxBatch, threads);
            long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            // Beyond the buffers' elements: object and array headers, the thread objects. Far less than a buffer.
            Assert.InRange(allocated, planned, planned + 32 * 1024);
        }
    }

    [Fact]
    public void Kernel_entry_points_reject_short_spans_and_foreign_indices()
    {
        var spec = new ModelSpec([12, 9, 5], Activation.Tanh, Loss.CrossEntropy);
        using var bp = new BatchBackprop(spec, 8);
        var parameters = Initializer.Create(spec, InitScheme.PyTorch, seed: 1);
        var labels = new byte[8];
        bp.Input(8).Fill(0.5f);
        Assert.Throws<ArgumentException>(() => bp.GradientSum(parameters, 8, labels, new float[parameters.Length - 1]));
        Assert.Throws<ArgumentException>(() => bp.GradientSum(parameters.AsSpan(1), 8, labels, new float[parameters.Length]));
        Assert.Throws<ArgumentException>(() => bp.Forward(parameters, 8, labels.AsSpan(1)));
        Assert.ThrowsAny<ArgumentException>(() => bp.Input(9));
        Assert.ThrowsAny<ArgumentException>(() => bp.Forward(parameters, 9, new byte[9]));
        bp.Forward(parameters, 8, labels);
        Assert.ThrowsAny<ArgumentException>(() => bp.Predict(8));

        var data = new Dataset("tiny", 3, 4, new byte[10 * 12], new byte[10], 5);
        Assert.ThrowsAny<ArgumentException>(() => bp.LoadInputs(data, [0, 10]));
        Assert.ThrowsAny<ArgumentException>(() => bp.LoadInputs(data, [0, -1]));
        Assert.ThrowsAny<ArgumentException>(() => bp.LoadInputs(data, [0, 1], next: [int.MaxValue]));
        Assert.ThrowsAny<ArgumentException>(() => data.CopyInputs([10], new float[12]));
        Assert.Throws<ArgumentException>(() => data.CopyInputs([0, 1], new float[23]));

        // C = A·B with m = 4, n = 5, k = 3: A needs 12 elements, B 15, C 20.
        float[] a = new float[12], b = new float[15], c = new float[20];
        Gemm.Multiply(Gemm.Best, 0, 4, 5, 3, a, 3, 1, b, 5, c, 5);
        Assert.Throws<ArgumentException>(() => Gemm.Multiply(Gemm.Best, 0, 4, 5, 3, a, 3, 1, b, 5, c.AsSpan(1), 5));
        Assert.Throws<ArgumentException>(() => Gemm.Multiply(Gemm.Best, 0, 4, 5, 3, a.AsSpan(1), 3, 1, b, 5, c, 5));
        Assert.Throws<ArgumentException>(() => Gemm.Multiply(Gemm.Best, 0, 4, 5, 3, a, 3, 1, b.AsSpan(1), 5, c, 5));
        Assert.Throws<ArgumentException>(() => Gemm.Multiply(Gemm.Best, 0, 4, 5, 3, a, 3, 1, b, 5, c, int.MaxValue));
        Assert.ThrowsAny<ArgumentException>(() => Gemm.Multiply(Gemm.Best, 0, 4, 5, 3, a, 3, 1, b, 5, c, -5));
    }

    [Fact]
    public void Numbers_from_messages_are_checked_before_they_index_anything()
    {
        var plan = new EpochPlan(sampleCount: 103, batchSize: 10, chunkSize: 4, seed: 1, epoch: 0);
        Assert.Equal(3, plan.Chunk(10, 0).Length);
        Assert.ThrowsAny<ArgumentException>(() => plan.Chunk(10, 1));
        Assert.ThrowsAny<ArgumentException>(() => plan.Chunk(0, int.MaxValue / 4 + 1));
        Assert.ThrowsAny<ArgumentException>(() => plan.Chunk(int.MaxValue, 0));
        Assert.ThrowsAny<ArgumentException>(() => new EpochPlan(-1, 10, 4, 1, 0));
        Assert.ThrowsAny<ArgumentException>(() => new EpochPlan(10, 0, 1, 1, 0));

        Assert.Throws<ArgumentException>(() => Evaluation.Empty(10).Add(Evaluation.Empty(3)));
        Assert.Throws<ArgumentException>(() => Evaluation.Empty(8192));
        Assert.Throws<ArgumentException>(() => new ModelSpec([784, 8192], Activation.Relu, Loss.CrossEntropy).Validate());
        var sum = new PairwiseSum(4, 2);
        Assert.ThrowsAny<ArgumentException>(() => sum.Begin(3));
        Assert.ThrowsAny<ArgumentException>(() => new PairwiseSum(0, 2));
        Assert.False(PairwiseSum.IsNode(0, 5, 4));
        Assert.Throws<ArgumentException>(() => ResourceLimits.CheckMessageBytes(ResourceLimits.MaxMessageBytes + 1, "a payload"));
        ResourceLimits.CheckMessageBytes(ResourceLimits.MaxMessageBytes, "a payload");
    }

    [Theory]
    [InlineData("../x")]
    [InlineData("../../etc")]
    [InlineData("/etc")]
    [InlineData("")]
    [InlineData("MNIST")]
    public void Only_known_dataset_names_become_directories(string name)
    {
        var e = Assert.Throws<ArgumentException>(() => DatasetCatalog.DirectoryOf("/data", name));
        Assert.StartsWith($"dataset: unknown '{name}'", e.Message);
        Assert.Equal(Path.Combine("/data", "mnist"), DatasetCatalog.DirectoryOf("/data", "mnist"));
    }
}
