using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using Backprop.Core.Data;
using Backprop.Core.Model;

namespace Backprop.Core.Numerics;

/// <summary>Entries [start, start + values.Length) of a gradient sum, final; the span is valid during the call only.</summary>
public delegate void GradientBlock(int start, ReadOnlySpan<float> values);

/// <summary>
/// Batched forward and backward passes over one chunk of samples, in float, on spans over the flat
/// parameter vector. Buffers are allocated (pinned) once for <c>maxBatch</c>; a step allocates nothing.
///
/// The model has L = layers.Length − 1 weight layers; layer l maps in_l = layers[l] units to out_l = layers[l+1] = in_(l+1), with
/// W_l out_l × in_l and b_l out_l, views into the flat vector (<see cref="ParameterLayout"/>).
/// Activations and deltas are kept feature-major — one row per unit, one column per sample, rows padded
/// to mp = n rounded up to 16 — so every product is a <see cref="Gemm"/> over contiguous rows:
///   x, xᵀ      n × in_0, in_0 × mp   the input batch
///   actT[l]    in_l × mp      actT[0] = xᵀ;  actT[l+1] = f(W_l · actT[l] + b_l)          (forward)
///   act[l]     n × in_l       sample-major copy of actT[l] (l ≥ 1), the right-hand side of BP4
///   deltaT[l]  out_l × mp     ∂C/∂z of layer l per sample; padding columns are zero
///   gW_l       out_l × in_l   = deltaT[l] · act[l]                                       (BP4)
///   gb_l       out_l          = Σ_i deltaT[l][:, i]                                      (BP3)
///   deltaT[l-1]               = (W_lᵀ · deltaT[l]) ⊙ f'(actT[l])                         (BP2)
/// The gradient is the sum over the batch, not the mean: the server divides.
///
/// Threads split rows, never samples, and every output element is a fixed-order sum (see
/// <see cref="Gemm"/>), so results are bit-identical for any thread count. The first layer holds almost
/// all the work (784 inputs), the others are small; a step has three parallel phases:
///   1. <see cref="FirstLayerRows"/>: each thread loads its own copy of x and computes its rows of
///      actT[1] = f(W_0·xᵀ + b_0), into the one buffer all threads share;
///   2. <see cref="LaterLayers"/>: every thread computes the later layers forward, the cost and BP1, and
///      BP2 down to deltaT[1], all whole and in its own buffers, then BP2 for its own rows of deltaT[0];
///   3. <see cref="WeightGradientRows"/>: each thread its rows of every layer's weight gradient (those of
///      W_0 are the rows it computed in 1).
/// Only actT[1] and the small layers' weights pass between cores: split across threads, the small layers'
/// products would cost a cache-line transfer for nearly every value they produce and a hand-off per
/// product, more than computing them twice (measured in bench/README.md, "Why BatchBackprop is shaped
/// this way").
///
/// The operation in progress is one <see cref="Pass"/>, filled on the caller's thread and handed to every
/// phase as a parameter; the fields of this class are the model and the buffers, fixed at construction.
/// </summary>
public sealed unsafe class BatchBackprop : IDisposable
{
    private const int Pad = 16;
    private readonly ParameterLayout _layout;
    private readonly Gemm.Isa _isa;
    private readonly RowParallel _parallel;
    /// <summary>Each thread's own buffers, by thread index (0 is the caller).</summary>
    private readonly ThreadBuffers[] _threadBuffers;
    /// <summary>actT[1], out_0 × mp: the first layer's output, written in phase 1 by rows, read whole by every thread.</summary>
    private readonly float[] _firstLayerOutputT;
    private readonly Pass _pass;
    /// <summary>The three phases as delegates, made once: a method group converted per call would allocate.</summary>
    private readonly Action<Pass, int, int, int> _firstLayerRows, _laterLayers, _weightGradientRows;

    /// <summary>
    /// The operation in progress. The batch part is set by <see cref="LoadInputs"/> or <see cref="Input"/> and
    /// kept until the next; the call part by each <see cref="Forward"/>, <c>GradientSum</c> or
    /// <see cref="GradientSumAndUpdate"/>. Written on the caller's thread before a phase starts, only read by
    /// the row threads. One per instance, reused: a call allocates nothing.
    /// </summary>
    private sealed class Pass(int maxBatch)
    {
        /// <summary>Where the samples come from; null when the caller wrote x by hand (<see cref="Input"/>), one copy all threads read.</summary>
        public Dataset? Data;
        /// <summary>Indices into <see cref="Data"/> of the batch's n samples.</summary>
        public readonly int[] Samples = new int[maxBatch];
        /// <summary>Indices of the next batch's samples (the first <see cref="NextCount"/>), fetched into cache during phase 3.</summary>
        public readonly int[] NextSamples = new int[maxBatch];
        public int NextCount;
        /// <summary>Counts the loads; a thread whose copy of x is of another version loads it again.</summary>
        public int InputVersion;

        /// <summary>n, the samples in the batch, and mp, n rounded up to 16: the row length of every feature-major buffer.</summary>
        public int N, Mp;
        /// <summary>The class of each of the n samples.</summary>
        public readonly byte[] Labels = new byte[maxBatch];
        /// <summary>False for a forward pass alone: no deltas, no sample-major copies.</summary>
        public bool Backward;
        /// <summary>The flat parameter vector, pinned for the call.</summary>
        public float* Parameters;
        /// <summary>The flat gradient to overwrite, or null: then each block goes to <see cref="Ready"/>.</summary>
        public float* Gradient;
        public GradientBlock? Ready;
        /// <summary><see cref="Ready"/> writes <see cref="Parameters"/> in place (see <see cref="ClaimUpdatedLines"/>).</summary>
        public bool UpdatesInPlace;
    }

    /// <summary>What one thread computes for itself: its copy of the inputs, the later layers, the deltas.</summary>
    private sealed class ThreadBuffers(Sizes sizes)
    {
        /// <summary>x, n × in_0, sample-major: the right-hand side of the first layer's BP4.</summary>
        public readonly float[] Input = Pinned(sizes.Input);
        /// <summary>xᵀ, in_0 × mp: the right-hand side of the first layer's forward product.</summary>
        public readonly float[] InputT = Pinned(sizes.InputT);
        /// <summary>The <see cref="Pass.InputVersion"/> that <see cref="Input"/> and <see cref="InputT"/> hold.</summary>
        public int LoadedVersion;
        /// <summary>actT[l], in_l × mp, for l ≥ 2; actT[1] too when it is the output (a model without hidden layers).</summary>
        public readonly float[][] ActT = sizes.ActT.Select(Pinned).ToArray();
        /// <summary>act[l], n × in_l, for 1 ≤ l &lt; L.</summary>
        public readonly float[][] Act = sizes.Act.Select(Pinned).ToArray();
        /// <summary>deltaT[l], out_l × mp, for every layer (of deltaT[0], only this thread's rows are written).</summary>
        public readonly float[][] DeltaT = sizes.DeltaT.Select(Pinned).ToArray();
        /// <summary>The cost of each of the n samples, summed in sample order into <see cref="Loss"/>.</summary>
        public readonly double[] SampleLoss = new double[sizes.MaxBatch];
        public double Loss;
        /// <summary>Softmax's per-sample maximum logit and sum of exponentials, mp each.</summary>
        public readonly float[] SoftmaxMaxAndSum = Pinned(sizes.SoftmaxMaxAndSum);
        /// <summary>Gradient entries on their way to a <see cref="GradientBlock"/> callback: 4 weight rows, or a run of biases.</summary>
        public readonly float[] ReadyBlock = Pinned(sizes.ReadyBlock);
    }

    /// <summary>
    /// Element counts of every buffer (0: none), in 64-bit arithmetic. The allocation and
    /// <see cref="BufferBytes"/> both read them, so the sizes checked are the sizes allocated.
    /// </summary>
    private sealed class Sizes
    {
        public Sizes(ModelSpec spec, int maxBatch)
        {
            long n = maxBatch, mp = RoundUp(maxBatch);
            int[] layers = spec.Layers;
            int count = layers.Length;
            MaxBatch = maxBatch;
            Input = n * layers[0];
            InputT = layers[0] * mp;
            ActT = Enumerable.Range(0, count).Select(l => l < 2 && l < count - 1 ? 0 : layers[l] * mp).ToArray();
            Act = Enumerable.Range(0, count).Select(l => l == 0 || l == count - 1 ? 0 : n * layers[l]).ToArray();
            DeltaT = layers[1..].Select(size => size * mp).ToArray();
            SoftmaxMaxAndSum = 2 * mp;
            ReadyBlock = Math.Max(4L * layers[..^1].Max(), layers[1..].Max());
            FirstLayerOutputT = layers[1] * mp;
            long floats = PinnedLength(Input) + PinnedLength(InputT) + ActT.Sum(PinnedLength) + Act.Sum(PinnedLength)
                + DeltaT.Sum(PinnedLength) + PinnedLength(SoftmaxMaxAndSum) + PinnedLength(ReadyBlock);
            ThreadBytes = checked(floats * sizeof(float) + n * sizeof(double));
            // The first layer's output, and the sample indices, next indices and labels of the batch.
            SharedBytes = checked(PinnedLength(FirstLayerOutputT) * sizeof(float) + n * (2 * sizeof(int) + sizeof(byte)));
        }

        public readonly int MaxBatch;
        public readonly long Input, InputT, SoftmaxMaxAndSum, ReadyBlock, FirstLayerOutputT, ThreadBytes, SharedBytes;
        public readonly long[] ActT, Act, DeltaT;
        public long TotalBytes(int threads) => checked(SharedBytes + threads * ThreadBytes);
    }

    /// <summary>
    /// The bytes of the buffers a <see cref="BatchBackprop"/> of these arguments allocates (every thread's
    /// and the shared ones), computed without allocating them. Throws <see cref="ArgumentException"/> for
    /// an invalid model, and for sizes over <see cref="ResourceLimits"/>: the constructor checks this
    /// before it allocates anything.
    /// </summary>
    public static long BufferBytes(ModelSpec spec, int maxBatch, int threads) => Plan(spec, maxBatch, threads).TotalBytes(threads);

    private static Sizes Plan(ModelSpec spec, int maxBatch, int threads)
    {
        spec.Validate();
        if (maxBatch < 1 || maxBatch > ResourceLimits.MaxChunkSize)
            throw new ArgumentOutOfRangeException(nameof(maxBatch), $"chunk-size: {maxBatch} is outside 1..{ResourceLimits.MaxChunkSize}");
        if (threads < 1 || threads > ResourceLimits.MaxThreadsPerWorker)
            throw new ArgumentOutOfRangeException(nameof(threads), $"threads-per-worker: {threads} is outside 1..{ResourceLimits.MaxThreadsPerWorker}");
        var sizes = new Sizes(spec, maxBatch);
        string what = $"chunk-size {maxBatch} x layers [{string.Join(",", spec.Layers)}]";
        // The shared buffers are smaller than one thread's (which holds deltaT[0], as large as actT[1]), so this bounds them too.
        if (sizes.ThreadBytes > ResourceLimits.MaxThreadBufferBytes)
            throw new ArgumentException($"{what}: {ResourceLimits.Bytes(sizes.ThreadBytes)} of activations and deltas per worker thread, over the {ResourceLimits.Bytes(ResourceLimits.MaxThreadBufferBytes)} limit");
        long total = sizes.TotalBytes(threads);
        if (total > ResourceLimits.MaxWorkerBufferBytes)
            throw new ArgumentException($"{what}, {threads} threads per worker: {ResourceLimits.Bytes(total)} of backprop buffers per worker, over the {ResourceLimits.Bytes(ResourceLimits.MaxWorkerBufferBytes)} limit");
        return sizes;
    }

    /// <summary>Throws <see cref="ArgumentException"/> before allocating when the sizes are over <see cref="ResourceLimits"/> (see <see cref="BufferBytes"/>).</summary>
    public BatchBackprop(ModelSpec spec, int maxBatch, int threads = 1, Gemm.Isa? isa = null)
    {
        var sizes = Plan(spec, maxBatch, threads);
        Spec = spec;
        MaxBatch = maxBatch;
        _layout = new ParameterLayout(spec);
        _isa = isa ?? Gemm.Best;
        _parallel = new RowParallel(threads);
        _threadBuffers = Enumerable.Range(0, threads).Select(_ => new ThreadBuffers(sizes)).ToArray();
        _firstLayerOutputT = Pinned(sizes.FirstLayerOutputT);
        _pass = new Pass(maxBatch);
        _firstLayerRows = FirstLayerRows;
        _laterLayers = LaterLayers;
        _weightGradientRows = WeightGradientRows;
    }

    public ModelSpec Spec { get; }
    public int MaxBatch { get; }
    public ParameterLayout Layout => _layout;
    public RowParallel Parallel => _parallel;

    /// <summary>The input rows (n × in_0, sample-major) to fill by hand before <see cref="Forward"/> or <see cref="GradientSum"/>; all threads read this one copy.</summary>
    public Span<float> Input(int n)
    {
        _pass.Data = null;
        return new Span<float>(Ptr(_threadBuffers[0].Input), CheckBatch(n) * Spec.InputSize);
    }

    /// <summary>
    /// Takes the samples at <paramref name="indices"/> as the input batch (scaled to [0, 1]). Each thread
    /// loads the whole batch into its own copy when its first-layer rows need it: a copy shared between
    /// cores would cost a cross-core transfer per cache line on every step. During the weight gradients
    /// each thread asks its core to start fetching the samples at <paramref name="next"/> (the next batch,
    /// if known): random samples are cache misses otherwise, and each core needs them in its own cache.
    /// </summary>
    public void LoadInputs(Dataset data, ReadOnlySpan<int> indices, ReadOnlySpan<int> next = default)
    {
        int n = CheckBatch(indices.Length);
        if (data.Features != Spec.InputSize) throw new ArgumentException($"{data.Name} has {data.Features} features; the model takes {Spec.InputSize}");
        // Checked here, on the caller's thread: the row threads read pixels at these indices through pointers.
        CheckIndices(data, indices, nameof(indices));
        CheckIndices(data, next, nameof(next));
        var pass = _pass;
        indices.CopyTo(pass.Samples);
        pass.NextCount = Math.Min(next.Length, MaxBatch);
        next[..pass.NextCount].CopyTo(pass.NextSamples);
        (pass.Data, pass.N, pass.Mp) = (data, n, RoundUp(n));
        pass.InputVersion++;
    }

    /// <summary>Forward pass over the n input rows; returns the summed cost against the labels.</summary>
    public double Forward(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels)
    {
        var pass = Begin(parameters, n, labels, backward: false);
        fixed (float* p = parameters)
        {
            pass.Parameters = p;
            _parallel.Run(_layout.Out(0), pass, _firstLayerRows);
            LaterLayers(pass, 0, 0, 0);
            pass.Parameters = null;
        }
        return _threadBuffers[0].Loss;
    }

    /// <summary>
    /// Writes Σ_samples ∂C/∂θ into <paramref name="gradient"/> (overwritten, flat layout) and returns the
    /// summed cost. The inputs must already be loaded (<see cref="LoadInputs"/> or <see cref="Input"/>).
    /// </summary>
    public double GradientSum(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, Span<float> gradient)
    {
        if (gradient.Length != _layout.Length) throw new ArgumentException("gradient has the wrong length", nameof(gradient));
        return Backward(parameters, n, labels, gradient, null, updatesInPlace: false);
    }

    /// <summary>
    /// The same sum, not written anywhere: each block of it goes to <paramref name="ready"/> as soon as it
    /// is final, from the thread that computed it, while it is still in that core's L1 (blocks of up to 4
    /// weight rows, and each thread's run of biases; threads call it at once for disjoint ranges).
    /// </summary>
    /// <param name="lossKnown">Told the summed cost on the calling thread once the forward pass is done, before any block.</param>
    public double GradientSum(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, GradientBlock ready, Action<double>? lossKnown = null) =>
        Backward(parameters, n, labels, default, ready, updatesInPlace: false, lossKnown);

    /// <summary>
    /// <see cref="GradientSum(ReadOnlySpan{float}, int, ReadOnlySpan{byte}, GradientBlock)"/> for a callback that
    /// updates <paramref name="parameters"/> in place: no weight is read once the first block is reported, so a
    /// step's last chunk applies the optimizer this way and its gradient never goes through memory. This method
    /// rewrites some parameters with their own values, to take their cache lines early (see <see cref="ClaimUpdatedLines"/>).
    /// </summary>
    public double GradientSumAndUpdate(Span<float> parameters, int n, ReadOnlySpan<byte> labels, GradientBlock update) =>
        Backward(parameters, n, labels, default, update, updatesInPlace: true);

    /// <summary>The three phases of a gradient sum; see the class summary.</summary>
    private double Backward(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, Span<float> gradient, GradientBlock? ready, bool updatesInPlace,
        Action<double>? lossKnown = null)
    {
        var pass = Begin(parameters, n, labels, backward: true);
        int m = _layout.Out(0);
        fixed (float* p = parameters)
        fixed (float* g = gradient)
        {
            pass.Parameters = p;
            pass.Gradient = g;
            (pass.Ready, pass.UpdatesInPlace) = (ready, updatesInPlace);
            _parallel.Run(m, pass, _firstLayerRows);
            _parallel.Run(m, pass, _laterLayers);
            lossKnown?.Invoke(_threadBuffers[0].Loss);   // phase 2 summed the cost; phase 3 reports the blocks
            _parallel.Run(m, pass, _weightGradientRows);
            pass.Ready = null;
            pass.Parameters = pass.Gradient = null;
        }
        return _threadBuffers[0].Loss;
    }

    /// <summary>Checks the arguments of a call and fills the call part of the <see cref="Pass"/>; transposes an input written by hand.</summary>
    private Pass Begin(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, bool backward)
    {
        var pass = _pass;
        CheckBatch(n);
        if (parameters.Length != _layout.Length) throw new ArgumentException("parameters have the wrong length", nameof(parameters));
        if (labels.Length < n) throw new ArgumentException("fewer labels than samples", nameof(labels));
        if (pass.Data is not null && n != pass.N) throw new ArgumentException($"{pass.N} samples were loaded, not {n}", nameof(n));
        // Checked here, on the caller's thread: the row threads must not throw.
        for (int i = 0; i < n; i++)
            if (labels[i] >= Spec.OutputSize) throw new ArgumentException($"label {labels[i]} is outside the model's {Spec.OutputSize} outputs");
        labels[..n].CopyTo(pass.Labels);
        (pass.N, pass.Mp, pass.Backward) = (n, RoundUp(n), backward);
        if (pass.Data is null)
        {
            var shared = _threadBuffers[0];
            Transpose.Run(Ptr(shared.Input), n, Spec.InputSize, Spec.InputSize, Ptr(shared.InputT), pass.Mp);
        }
        return pass;
    }

    /// <summary>Index of the largest output of sample i after a forward pass.</summary>
    public int Predict(int i)
    {
        int n = _pass.N, mp = _pass.Mp;
        if ((uint)i >= (uint)n) throw new ArgumentOutOfRangeException(nameof(i), $"sample {i} is outside the batch of {n}");
        float* a = Ptr(_threadBuffers[0].ActT[^1]);
        int best = 0;
        for (int o = 1; o < Spec.OutputSize; o++)
            if (a[o * mp + i] > a[best * mp + i]) best = o;
        return best;
    }

    /// <summary>The buffers holding the copy of x and xᵀ that thread <paramref name="thread"/> reads, loaded on first use.</summary>
    private ThreadBuffers LoadedInputs(Pass pass, int thread)
    {
        if (pass.Data is not { } data) return _threadBuffers[0];
        var own = _threadBuffers[thread];
        if (own.LoadedVersion != pass.InputVersion)
        {
            int features = Spec.InputSize, n = pass.N;
            data.CopyInputs(pass.Samples.AsSpan(0, n), new Span<float>(Ptr(own.Input), n * features));
            Transpose.Run(Ptr(own.Input), n, features, features, Ptr(own.InputT), pass.Mp);
            own.LoadedVersion = pass.InputVersion;
        }
        return own;
    }

    /// <summary>
    /// Phase 1 on one thread: the first layer's forward for its units [from, to).
    ///   reads   xᵀ       in_0 × mp          this thread's copy (loaded here on first use)
    ///           W_0      rows [from, to) × in_0, b_0 [from, to)
    ///   writes  actT[1]  rows [from, to) × mp = f(W_0 · xᵀ + b_0), shared (the output itself, f = identity, when L = 1)
    /// </summary>
    private void FirstLayerRows(Pass pass, int thread, int from, int to)
    {
        int inSize = _layout.In(0), mp = pass.Mp;
        float* p = pass.Parameters, z = Ptr(_firstLayerOutputT);
        new GemmJob(_isa, mp, inSize, p + _layout.WeightOffset(0), inSize, 1, Ptr(LoadedInputs(pass, thread).InputT), mp, z, mp).Rows(from, to);
        AddBiasAndActivate(z + from * mp, to - from, mp, p + _layout.BiasOffset(0) + from, _layout.LayerCount > 1 ? Spec.Activation : null);
    }

    /// <summary>
    /// Phase 2 on one thread, whose first-layer units are [from, to): the rest of the forward pass and, when
    /// training, of the deltas, all whole in this thread's buffers except the last BP2, of which it computes
    /// only its own rows (the rows of W_0 it takes in phase 3). A forward pass alone runs this on the caller.
    /// </summary>
    private void LaterLayers(Pass pass, int thread, int from, int to)
    {
        var own = _threadBuffers[thread];
        LaterLayersForward(pass, own);
        own.Loss = OutputAndLoss(pass, own);
        if (!pass.Backward) return;
        OutputDelta(pass, own);
        HiddenDeltas(pass, own, from, to);
    }

    /// <summary>
    /// Layers 1 … L−1 forward, whole, on one thread.
    ///   reads   actT[1]    out_0 × mp         shared, every thread's rows from phase 1
    ///           W_l, b_l   out_l × in_l, out_l     for 1 ≤ l &lt; L
    ///   writes  actT[l+1]  out_l × mp         for 1 ≤ l &lt; L, own; actT[L] holds the logits (a copy of actT[1] when L = 1)
    ///           act[l]     n × in_l           for 1 ≤ l &lt; L, own, when training: the sample-major copies BP4 reads
    /// </summary>
    private void LaterLayersForward(Pass pass, ThreadBuffers own)
    {
        int L = _layout.LayerCount, n = pass.N, mp = pass.Mp;
        float* p = pass.Parameters;
        if (L == 1) new ReadOnlySpan<float>(Ptr(_firstLayerOutputT), Spec.OutputSize * mp).CopyTo(new Span<float>(Ptr(own.ActT[1]), Spec.OutputSize * mp));
        else if (pass.Backward) Transpose.Run(Ptr(_firstLayerOutputT), _layout.Out(0), n, mp, Ptr(own.Act[1]), _layout.Out(0));
        for (int l = 1; l < L; l++)
        {
            int inSize = _layout.In(l), outSize = _layout.Out(l);
            float* z = Ptr(own.ActT[l + 1]);
            new GemmJob(_isa, mp, inSize, p + _layout.WeightOffset(l), inSize, 1, ActTFor(own, l), mp, z, mp).Rows(0, outSize);
            bool hidden = l < L - 1;
            AddBiasAndActivate(z, outSize, mp, p + _layout.BiasOffset(l), hidden ? Spec.Activation : null);
            if (hidden && pass.Backward) Transpose.Run(z, outSize, n, mp, Ptr(own.Act[l + 1]), outSize);
        }
    }

    /// <summary>
    /// BP1 on one thread: δ = a − y (softmax + cross-entropy), times σ'(z) = a(1 − a) for sigmoid + quadratic.
    ///   reads   actT[L]      out_(L−1) × mp   the outputs; labels n
    ///   writes  deltaT[L−1]  out_(L−1) × mp   own; padding columns 0, so the sums over mp columns are sums over n
    /// </summary>
    private void OutputDelta(Pass pass, ThreadBuffers own)
    {
        int L = _layout.LayerCount, n = pass.N, mp = pass.Mp;
        float* aOut = Ptr(own.ActT[L]), dOut = Ptr(own.DeltaT[L - 1]);
        var labels = pass.Labels;
        bool quadratic = Spec.Loss == Loss.Quadratic;
        for (int o = 0; o < Spec.OutputSize; o++)
        {
            float* a = aOut + o * mp, d = dOut + o * mp;
            for (int i = 0; i < n; i++)
            {
                float diff = a[i] - (labels[i] == o ? 1f : 0f);
                d[i] = quadratic ? diff * (a[i] * (1f - a[i])) : diff;
            }
            for (int i = n; i < mp; i++) d[i] = 0f;
        }
    }

    /// <summary>
    /// BP2 on one thread, l = L−1 down to 1, with W_lᵀ read in place through the strides.
    ///   reads   deltaT[l]    out_l × mp       own
    ///           W_l          out_l × in_l     as W_lᵀ
    ///           actT[l]      in_l × mp        for f'(actT[l]): own for l ≥ 2, the shared actT[1] for l = 1
    ///   writes  deltaT[l−1]  in_l × mp        own; whole for l ≥ 2, rows [from, to) only for l = 1 (deltaT[0])
    /// </summary>
    private void HiddenDeltas(Pass pass, ThreadBuffers own, int from, int to)
    {
        int mp = pass.Mp;
        float* p = pass.Parameters;
        for (int l = _layout.LayerCount - 1; l >= 1; l--)
        {
            int inSize = _layout.In(l), outSize = _layout.Out(l);
            var (r0, r1) = l == 1 ? (from, to) : (0, inSize);
            float* prev = Ptr(own.DeltaT[l - 1]);
            new GemmJob(_isa, mp, outSize, p + _layout.WeightOffset(l), 1, inSize, Ptr(own.DeltaT[l]), mp, prev, mp).Rows(r0, r1);
            Activations.MultiplyByDerivative(Spec.Activation,
                new ReadOnlySpan<float>(ActTFor(own, l) + r0 * mp, (r1 - r0) * mp), new Span<float>(prev + r0 * mp, (r1 - r0) * mp));
        }
    }

    /// <summary>actT[l] as a thread reads it: its own xᵀ, the shared first-layer output, or its own later layers.</summary>
    private float* ActTFor(ThreadBuffers own, int l) =>
        l == 0 ? Ptr(own.InputT) : l == 1 && _layout.LayerCount > 1 ? Ptr(_firstLayerOutputT) : Ptr(own.ActT[l]);

    /// <summary>
    /// Phase 3 on one thread: BP3 and BP4 for its rows of every layer; of W_0, the rows [from, to) it
    /// computed in phase 1 (its rows of deltaT[0] are the only ones it has).
    ///   reads   deltaT[l]  own;  x n × in_0 (own copy), act[l] n × in_l for l ≥ 1 (own)
    ///   writes  gW_l, gb_l of its rows: into the gradient, or block by block to the callback
    /// </summary>
    private void WeightGradientRows(Pass pass, int thread, int from, int to)
    {
        var own = _threadBuffers[thread];
        int parts = _parallel.PartsFor(_layout.Out(0));
        WeightGradient(pass, own, 0, Ptr(LoadedInputs(pass, thread).Input), from, to, thread, parts);
        for (int l = 1; l < _layout.LayerCount; l++)
        {
            var (r0, r1) = LaterLayerRows(l, thread, parts);
            if (r1 > r0) WeightGradient(pass, own, l, Ptr(own.Act[l]), r0, r1, thread, parts);
        }
    }

    /// <summary>The rows of layer l ≥ 1 that thread computes in phase 3 (none when the layer is too small to split).</summary>
    private (int From, int To) LaterLayerRows(int l, int thread, int parts)
    {
        int outSize = _layout.Out(l), layerParts = Math.Min(parts, _parallel.PartsFor(outSize));
        return thread < layerParts ? RowParallel.Bounds(outSize, thread, layerParts) : (0, 0);
    }

    /// <summary>
    /// Rows [from, to) of layer l's weight gradients, 4 rows (one register tile) at a time: into the
    /// gradient, or each block to the callback while it is in L1.
    ///   reads   deltaT[l]  rows [from, to) × mp   own
    ///           act        n × in_l               x for l = 0, act[l] otherwise (sample-major)
    ///   writes  gb_l       [from, to)             = Σ_i deltaT[l][r, i]          (BP3)
    ///           gW_l       rows [from, to) × in_l = deltaT[l] · act              (BP4)
    /// Over the first layer's rows the thread also asks for the next batch's samples, a few with each block
    /// (asked for all at once, many are evicted again before use), and, when the callback updates
    /// parameters, claims the later layers' rows it will update (see <see cref="ClaimUpdatedLines"/>).
    /// </summary>
    private void WeightGradient(Pass pass, ThreadBuffers own, int l, float* act, int from, int to, int thread, int parts)
    {
        int inSize = _layout.In(l), mp = pass.Mp, n = pass.N, blocks = (to - from + 3) / 4, prefetched = 0;
        bool first = l == 0, prefetch = first && pass.Data is not null && pass.NextCount > 0;
        var ready = pass.Ready;
        float* gradient = pass.Gradient, delta = Ptr(own.DeltaT[l]), block = Ptr(own.ReadyBlock);
        BiasGradient(delta + from * mp, to - from, mp, n, ready is null ? gradient + _layout.BiasOffset(l) + from : block);
        ready?.Invoke(_layout.BiasOffset(l) + from, new ReadOnlySpan<float>(block, to - from));
        for (int r = from, b = 1; r < to; r += 4, b++)
        {
            if (prefetch)
            {
                int upTo = (int)((long)pass.NextCount * b / blocks);
                pass.Data!.Prefetch(pass.NextSamples.AsSpan(prefetched, upTo - prefetched));
                prefetched = upTo;
            }
            if (first && pass.UpdatesInPlace && parts > 1) ClaimUpdatedLines(pass, thread, parts, b, blocks);
            int rows = Math.Min(4, to - r);
            float* c = ready is null ? gradient + _layout.WeightOffset(l) + r * inSize : block;
            new GemmJob(_isa, inSize, n, delta + r * mp, mp, 1, act, inSize, c, inSize).Rows(0, rows);
            ready?.Invoke(_layout.WeightOffset(l) + r * inSize, new ReadOnlySpan<float>(block, rows * inSize));
        }
    }

    /// <summary>
    /// Rewrites share <paramref name="part"/>/<paramref name="partCount"/> of the later layers' parameters that this
    /// thread's callbacks will update, each cache line with its own value. The other threads read those lines
    /// in phase 2, so the update must first take them back from their cores; a plain store does that in the
    /// background while the first layer's rows are computed, where the updates themselves (two stores a
    /// value, parameter and velocity) would fill the store buffer and stall. Nothing reads these parameters
    /// in phase 3, and in this mode the caller lets the callback write them in place.
    /// </summary>
    private void ClaimUpdatedLines(Pass pass, int thread, int parts, int part, int partCount)
    {
        const int lineFloats = 16;
        float* p = pass.Parameters;
        for (int l = 1; l < _layout.LayerCount; l++)
        {
            var (r0, r1) = LaterLayerRows(l, thread, parts);
            if (r1 <= r0) continue;
            int inSize = _layout.In(l);
            Touch(p + _layout.WeightOffset(l) + r0 * inSize, (r1 - r0) * inSize);
            Touch(p + _layout.BiasOffset(l) + r0, r1 - r0);
        }

        void Touch(float* values, int length)
        {
            int a = (int)((long)length * (part - 1) / partCount), e = (int)((long)length * part / partCount);
            for (int i = a; i < e; i += lineFloats) values[i] = values[i];
            if (part == partCount) values[length - 1] = values[length - 1];
        }
    }

    /// <summary>
    /// z[o, :] = f(z[o, :] + b[o]) for each row, in place; f = null adds the bias alone. ReLU is fused into one
    /// pass, the others use TensorPrimitives.
    ///   reads   bias  rows
    ///   writes  z     rows × mp
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AddBiasAndActivate(float* z, int rows, int mp, float* bias, Activation? f)
    {
        for (int o = 0; o < rows; o++)
        {
            float* row = z + o * mp;
            if (f == Activation.Relu && Vector512.IsHardwareAccelerated)
            {
                var b = Vector512.Create(bias[o]);
                for (int i = 0; i < mp; i += 16)
                    Vector512.Max(Vector512.Load(row + i) + b, Vector512<float>.Zero).Store(row + i);
                continue;
            }
            var span = new Span<float>(row, mp);
            TensorPrimitives.Add(span, bias[o], span);
            if (f is { } activation) Activations.Apply(activation, span);
        }
    }

    /// <summary>
    /// BP3: gB[o] = Σ_i δ[o, i], each sum in sample order; four rows at a time to overlap the chains.
    ///   reads   delta  rows × mp, the first n columns
    ///   writes  gB     rows
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void BiasGradient(float* delta, int rows, int mp, int n, float* gB)
    {
        int o = 0;
        for (; o + 4 <= rows; o += 4)
        {
            float* d0 = delta + o * mp, d1 = d0 + mp, d2 = d1 + mp, d3 = d2 + mp;
            float s0 = 0f, s1 = 0f, s2 = 0f, s3 = 0f;
            for (int i = 0; i < n; i++) { s0 += d0[i]; s1 += d1[i]; s2 += d2[i]; s3 += d3[i]; }
            gB[o] = s0; gB[o + 1] = s1; gB[o + 2] = s2; gB[o + 3] = s3;
        }
        for (; o < rows; o++)
        {
            float* d = delta + o * mp;
            float sum = 0f;
            for (int i = 0; i < n; i++) sum += d[i];
            gB[o] = sum;
        }
    }

    /// <summary>
    /// The output activation and the cost, on one thread.
    ///   reads   actT[L]  out_(L−1) × mp   own: the logits; labels n
    ///   writes  actT[L]  out_(L−1) × mp   in place: the outputs (softmax, or sigmoid for the quadratic cost)
    ///           the cost of each sample, n; returns their sum in sample order
    /// </summary>
    private double OutputAndLoss(Pass pass, ThreadBuffers own)
    {
        int outputs = Spec.OutputSize, mp = pass.Mp, n = pass.N;
        float* z = Ptr(own.ActT[^1]);
        var labels = pass.Labels;
        var sampleLoss = own.SampleLoss;
        if (Spec.Loss == Loss.Quadratic)
        {
            var all = new Span<float>(z, outputs * mp);
            TensorPrimitives.Sigmoid(all, all);
            for (int i = 0; i < n; i++)
            {
                double s = 0;
                for (int o = 0; o < outputs; o++) { double d = z[o * mp + i] - (labels[i] == o ? 1f : 0f); s += d * d; }
                sampleLoss[i] = 0.5 * s;
            }
        }
        else
        {
            // Column-wise softmax, vectorised across samples (rows are contiguous over samples). The cost
            // comes from the logits (log-sum-exp) before they are overwritten by the probabilities.
            float* max = Ptr(own.SoftmaxMaxAndSum), sum = max + mp;
            new Span<float>(z, mp).CopyTo(new Span<float>(max, mp));
            for (int o = 1; o < outputs; o++)
                TensorPrimitives.Max(new ReadOnlySpan<float>(max, mp), new ReadOnlySpan<float>(z + o * mp, mp), new Span<float>(max, mp));
            for (int i = 0; i < n; i++) sampleLoss[i] = max[i] - z[labels[i] * mp + i];
            new Span<float>(sum, mp).Clear();
            for (int o = 0; o < outputs; o++)
            {
                var row = new Span<float>(z + o * mp, mp);
                TensorPrimitives.Subtract(row, new ReadOnlySpan<float>(max, mp), row);
                TensorPrimitives.Exp(row, row);
                TensorPrimitives.Add(new ReadOnlySpan<float>(sum, mp), row, new Span<float>(sum, mp));
            }
            for (int o = 0; o < outputs; o++)
            {
                var row = new Span<float>(z + o * mp, mp);
                TensorPrimitives.Divide(row, new ReadOnlySpan<float>(sum, mp), row);
            }
            for (int i = 0; i < n; i++) sampleLoss[i] += Math.Log(sum[i]);
        }
        double loss = 0;
        for (int i = 0; i < n; i++) loss += sampleLoss[i];
        return loss;
    }

    public void Dispose() => _parallel.Dispose();

    private static int RoundUp(int n) => (n + Pad - 1) / Pad * Pad;

    // Buffers start on a cache line: a vector load that straddles two lines costs two, and two threads
    // writing either side of a row-split boundary must not share a line (.NET aligns arrays to 8 bytes).
    private const int LineFloats = 16;

    private static long PinnedLength(long length) => length == 0 ? 0 : length + LineFloats - 1;

    /// <summary>Lengths come from <see cref="Sizes"/>, checked against the limits, so the cast cannot truncate.</summary>
    private static float[] Pinned(long length) => length == 0 ? [] : GC.AllocateArray<float>((int)PinnedLength(length), pinned: true);

    /// <summary>The first element on a cache line of a pinned buffer: where its data starts.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float* Ptr(float[] pinned) => (float*)(((nint)Unsafe.AsPointer(ref pinned[0]) + 63) & ~(nint)63);

    private static void CheckIndices(Dataset data, ReadOnlySpan<int> indices, string name)
    {
        foreach (int index in indices)
            if ((uint)index >= (uint)data.Count) throw new ArgumentOutOfRangeException(name, $"sample {index} is outside {data.Name}'s {data.Count}");
    }

    private int CheckBatch(int n)
    {
        if (n < 1 || n > MaxBatch) throw new ArgumentOutOfRangeException(nameof(n), $"batch {n} is outside 1..{MaxBatch}");
        return n;
    }
}
