using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;

namespace Backprop.Tests.Core;

/// <summary>The fast path's promises: bit-identical results for any thread count and vector width, and no allocation per step.</summary>
public class FastPathTests
{
    private static readonly TrainTest Data = SyntheticDigits.Create(trainCount: 700, testCount: 10, seed: 21);

    public static TheoryData<Activation, Loss> Cases() => new()
    {
        { Activation.Relu, Loss.CrossEntropy },
        { Activation.Sigmoid, Loss.Quadratic },
        { Activation.Tanh, Loss.CrossEntropy },
    };

    private static float[] Gradient(ModelSpec spec, int n, int threads, Gemm.Isa? isa = null)
    {
        var p = Initializer.Create(spec, InitScheme.PyTorch, 3);
        using var bp = new BatchBackprop(spec, 64, threads, isa);
        var indices = Enumerable.Range(100, n).ToArray();
        bp.LoadInputs(Data.Train, indices);
        var grad = new float[p.Length];
        bp.GradientSum(p, n, Data.Train.Labels.AsSpan(100, n), grad);
        return grad;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Chunk_gradient_is_bit_identical_for_1_2_and_3_threads(Activation a, Loss l)
    {
        var spec = new ModelSpec([784, 128, 64, 10], a, l);
        // 37 samples: a padded batch, with row splits that are not multiples of the tiles.
        string one = ParameterHash.Sha256(Gradient(spec, 37, 1));
        Assert.Equal(one, ParameterHash.Sha256(Gradient(spec, 37, 2)));
        Assert.Equal(one, ParameterHash.Sha256(Gradient(spec, 37, 3)));
    }

    [Fact]
    public void Every_vector_width_gives_the_same_bits()
    {
        var spec = new ModelSpec([784, 30, 10], Activation.Sigmoid, Loss.Quadratic);
        string scalar = ParameterHash.Sha256(Gradient(spec, 10, 1, Gemm.Isa.Scalar));
        if (Gemm.Best >= Gemm.Isa.Vector256) Assert.Equal(scalar, ParameterHash.Sha256(Gradient(spec, 10, 1, Gemm.Isa.Vector256)));
        if (Gemm.Best >= Gemm.Isa.Vector512) Assert.Equal(scalar, ParameterHash.Sha256(Gradient(spec, 10, 1, Gemm.Isa.Vector512)));
    }

    [Fact]
    public void Gemm_matches_a_naive_product_with_odd_shapes_and_strides()
    {
        var rng = new Rng(5);
        foreach (var (m, n, k) in new[] { (1, 1, 1), (5, 70, 3), (9, 33, 17), (13, 129, 64) })
        {
            var a = Enumerable.Range(0, m * k).Select(_ => (float)rng.NextGaussian()).ToArray();
            var b = Enumerable.Range(0, k * (n + 3)).Select(_ => (float)rng.NextGaussian()).ToArray();
            foreach (var isa in new[] { Gemm.Isa.Scalar, Gemm.Isa.Vector256, Gemm.Isa.Vector512 }.Where(i => i <= Gemm.Best))
            {
                var c = new float[m * n];
                Gemm.Multiply(isa, 0, m, n, k, a, 1, m, b, n + 3, c, n);   // A read transposed: element (r, p) at p·m + r
                for (int r = 0; r < m; r++)
                    for (int j = 0; j < n; j++)
                    {
                        float expected = 0;
                        for (int p = 0; p < k; p++) expected = MathF.FusedMultiplyAdd(a[p * m + r], b[p * (n + 3) + j], expected);
                        Assert.Equal(expected, c[r * n + j]);
                    }
            }
        }
    }

    [Fact]
    public void Local_training_is_bit_identical_for_1_and_2_threads()
    {
        var spec = Presets.PyTorchMlp with { Seed = 2 };
        using var one = new LocalTrainer(spec, Data.Train, threads: 1);
        using var two = new LocalTrainer(spec, Data.Train, threads: 2);
        one.TrainEpoch(0);
        two.TrainEpoch(0);
        Assert.Equal(ParameterHash.Sha256(one.Parameters), ParameterHash.Sha256(two.Parameters));
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public void A_fused_one_chunk_step_equals_gradient_then_optimizer(int threads)
    {
        // LocalTrainer applies a one-chunk step's optimizer while the gradient is produced; the server
        // steps after the whole sum. Both must give the same bits.
        var spec = Presets.PyTorchMlp with { ChunkSize = 64, Seed = 8 };
        using var trainer = new LocalTrainer(spec, Data.Train, threads);
        trainer.TrainEpoch(0, maxSteps: 3);

        var p = Initializer.Create(spec.Model, spec.Init, spec.Seed);
        var velocity = new float[p.Length];
        var gradient = new float[p.Length];
        using var runner = new ChunkRunner(spec.Model, 64);
        var plan = new EpochPlan(Data.Train.Count, 64, 64, spec.Seed, 0);
        for (int step = 0; step < 3; step++)
        {
            runner.GradientSum(Data.Train, p, plan.Chunk(step, 0), gradient);
            Optimizer.For(spec.Optimizer).Step(0, p, gradient, plan.StepSize(step), velocity);
        }
        Assert.Equal(ParameterHash.Sha256(p), ParameterHash.Sha256(trainer.Parameters));
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void Each_threads_copy_of_the_inputs_follows_every_new_batch(int threads)
    {
        // One instance over batches of different samples and sizes, with a forward pass between load and
        // gradient and hand-filled inputs in the middle: every gradient must equal a fresh instance's.
        var spec = new ModelSpec([784, 64, 32, 10], Activation.Relu, Loss.CrossEntropy);
        var p = Initializer.Create(spec, InitScheme.PyTorch, 3);
        using var reused = new BatchBackprop(spec, 64, threads);
        foreach (var (start, n) in new[] { (0, 64), (300, 37), (500, 64), (100, 5) })
        {
            var indices = Enumerable.Range(start, n).ToArray();
            var labels = Data.Train.Labels.AsSpan(start, n);
            var fresh = new float[p.Length];
            using (var single = new BatchBackprop(spec, 64, 1))
            {
                Data.Train.CopyInputs(indices, single.Input(n));
                single.GradientSum(p, n, labels, fresh);
            }

            var grad = new float[p.Length];
            if (n == 5)
            {
                Data.Train.CopyInputs(indices, reused.Input(n));
            }
            else
            {
                reused.LoadInputs(Data.Train, indices, next: Enumerable.Range(600, 64).ToArray());
                reused.Forward(p, n, labels);
            }
            reused.GradientSum(p, n, labels, grad);
            Assert.Equal(ParameterHash.Sha256(fresh), ParameterHash.Sha256(grad));
        }
    }

    [Fact]
    public void A_training_step_allocates_nothing_once_warm()
    {
        // 700 samples at batch 4: 175 steps an epoch. One object per step would be at least 24 bytes a
        // step; the bound of 8 bytes a step leaves room for the runtime's own occasional allocations on
        // this thread in an unoptimised (Debug) build, which were measured at under 250 bytes an epoch.
        var spec = Presets.PyTorchMlp with { BatchSize = 4, ChunkSize = 4 };
        using var trainer = new LocalTrainer(spec, Data.Train, threads: 1);
        trainer.TrainEpoch(0);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int e = 1; e <= 3; e++) trainer.TrainEpoch(e);
        long perStep = (GC.GetAllocatedBytesForCurrentThread() - before) / (3 * 175);
        Assert.True(perStep < 8, $"{perStep} bytes allocated per step");
    }
}
