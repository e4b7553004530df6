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
/// Activations and deltas are kept feature-major — one row per unit, one column per sample, rows padded
/// to mp = n rounded up to 16 — so every product is a <see cref="Gemm"/> over contiguous rows:
///   x, xᵀ      n × in_0, in_0 × mp   the input batch
///   actT[l]    in_l × mp      actT[0] = xᵀ;  actT[l+1] = f(W_l · actT[l] + b_l)          (forward)
///   act[l]     n × in_l       sample-major copy of actT[l] (l ≥ 1), the right-hand side of BP4
///   deltaT[l]  out_l × mp     ∂C/∂z of layer l per sample; padding columns are zero
///   gW_l       out × in       = deltaT[l] · act[l]                                       (BP4)
///   gb_l       out            = Σ_i deltaT[l][:, i]                                      (BP3)
///   deltaT[l-1]               = (W_lᵀ · deltaT[l]) ⊙ f'(actT[l])                         (BP2)
/// The gradient is the sum over the batch, not the mean: the server divides.
///
/// Threads split rows, never samples, and every output element is a fixed-order sum (see
/// <see cref="Gemm"/>), so results are bit-identical for any thread count. The first layer holds almost
/// all the work (784 inputs), the others are small; a step has three parallel phases:
///   1. first-layer rows: each thread loads its own copy of x, computes its rows of actT[1] = f(W_0·xᵀ + b_0);
///   2. every thread computes the later layers forward, the cost and BP1, and BP2 down to deltaT[1], all
///      whole and in its own buffers, then BP2 for its own rows of deltaT[0];
///   3. weight gradients: each thread its rows of every layer (those of W_0 are the rows it computed in 1).
/// Only actT[1] and the small layers' weights pass between cores. Splitting the small layers' products
/// across threads instead costs a cache-line transfer for nearly every value they produce, and a hand-off
/// per product: on this project's 2-vCPU machine a transfer sometimes takes 330-600 ns instead of
/// 70-200 (when the host places the vCPUs far apart), which made a 2-thread step as slow as 1 thread.
/// </summary>
public sealed unsafe class BatchBackprop : IDisposable
{
    private const int Pad = 16;
    private readonly ParameterLayout _layout;
    private readonly Gemm.Isa _isa;
    private readonly RowParallel _parallel;
    private readonly ThreadBuffers[] _own;
    private readonly float[] _act1T;
    private readonly int[] _indices, _next;
    private readonly byte[] _labels;
    private readonly Action<int, int, int> _firstLayerRows, _laterLayers, _weightGradientRows;

    // The operation in progress, read by the row delegates on every thread.
    private int _n, _mp, _inputVersion, _nextCount;
    private bool _inputPerThread, _backward, _updating;
    private float* _p, _g;
    private Dataset? _data;
    private GradientBlock? _ready;

    /// <summary>What one thread computes for itself: its copy of the inputs, the later layers, the deltas.</summary>
    private sealed class ThreadBuffers(Sizes sizes)
    {
        public readonly float[] X = Pinned(sizes.X);
        public readonly float[] XT = Pinned(sizes.XT);
        public int LoadedVersion;
        /// <summary>actT[l] for l ≥ 2; actT[1] too when it is the output (a model without hidden layers).</summary>
        public readonly float[][] ActT = sizes.ActT.Select(Pinned).ToArray();
        public readonly float[][] Act = sizes.Act.Select(Pinned).ToArray();
        public readonly float[][] DeltaT = sizes.DeltaT.Select(Pinned).ToArray();
        public readonly double[] RowLoss = new double[sizes.MaxBatch];
        public readonly float[] Scratch = Pinned(sizes.Scratch);
        /// <summary>Gradient entries on their way to a <see cref="GradientBlock"/> callback: 4 weight rows, or a run of biases.</summary>
        public readonly float[] Block = Pinned(sizes.Block);
        public double Loss;
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
            X = n * layers[0];
            XT = layers[0] * mp;
            ActT = Enumerable.Range(0, count).Select(l => l < 2 && l < count - 1 ? 0 : layers[l] * mp).ToArray();
            Act = Enumerable.Range(0, count).Select(l => l == 0 || l == count - 1 ? 0 : n * layers[l]).ToArray();
            DeltaT = layers[1..].Select(size => size * mp).ToArray();
            Scratch = 2 * mp;
            Block = Math.Max(4L * layers[..^1].Max(), layers[1..].Max());
            Act1T = layers[1] * mp;
            long floats = PinnedLength(X) + PinnedLength(XT) + ActT.Sum(PinnedLength) + Act.Sum(PinnedLength)
                + DeltaT.Sum(PinnedLength) + PinnedLength(Scratch) + PinnedLength(Block);
            ThreadBytes = checked(floats * sizeof(float) + n * sizeof(double));
            // The first layer's output, and the sample indices, next indices and labels of the batch.
            SharedBytes = checked(PinnedLength(Act1T) * sizeof(float) + n * (2 * sizeof(int) + sizeof(byte)));
        }

        public readonly int MaxBatch;
        public readonly long X, XT, Scratch, Block, Act1T, ThreadBytes, SharedBytes;
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
        _own = Enumerable.Range(0, threads).Select(_ => new ThreadBuffers(sizes)).ToArray();
        _act1T = Pinned(sizes.Act1T);
        _indices = new int[maxBatch];
        _next = new int[maxBatch];
        _labels = new byte[maxBatch];
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
        (_inputPerThread, _data) = (false, null);
        return new Span<float>(P(_own[0].X), CheckBatch(n) * Spec.InputSize);
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
        indices.CopyTo(_indices);
        _nextCount = Math.Min(next.Length, MaxBatch);
        next[.._nextCount].CopyTo(_next);
        (_data, _n, _mp, _inputPerThread) = (data, n, RoundUp(n), true);
        _inputVersion++;
    }

    /// <summary>Forward pass over the n input rows; returns the summed cost against the labels.</summary>
    public double Forward(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels)
    {
        Begin(parameters, n, labels, backward: false);
        fixed (float* p = parameters)
        {
            _p = p;
            _parallel.Run(_layout.Out(0), _firstLayerRows);
            LaterLayers(0, 0, 0);
            _p = null;
        }
        return _own[0].Loss;
    }

    /// <summary>
    /// Writes Σ_samples ∂C/∂θ into <paramref name="gradient"/> (overwritten, flat layout) and returns the
    /// summed cost. The inputs must already be loaded (<see cref="LoadInputs"/> or <see cref="Input"/>).
    /// </summary>
    public double GradientSum(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, Span<float> gradient)
    {
        if (gradient.Length != _layout.Length) throw new ArgumentException("gradient has the wrong length", nameof(gradient));
        return Backward(parameters, n, labels, gradient, null, updating: false);
    }

    /// <summary>
    /// The same sum, not written anywhere: each block of it goes to <paramref name="ready"/> as soon as it
    /// is final, from the thread that computed it, while it is still in that core's L1 (blocks of up to 4
    /// weight rows, and each thread's run of biases; threads call it at once for disjoint ranges).
    /// </summary>
    public double GradientSum(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, GradientBlock ready) =>
        Backward(parameters, n, labels, default, ready, updating: false);

    /// <summary>
    /// <see cref="GradientSum(ReadOnlySpan{float}, int, ReadOnlySpan{byte}, GradientBlock)"/> for a callback that
    /// updates <paramref name="parameters"/> in place: no weight is read once the first block is reported, so a
    /// step's last chunk applies the optimizer this way and its gradient never goes through memory. This method
    /// rewrites some parameters with their own values, to take their cache lines early (see <see cref="TakeLines"/>).
    /// </summary>
    public double GradientSumAndUpdate(Span<float> parameters, int n, ReadOnlySpan<byte> labels, GradientBlock update) =>
        Backward(parameters, n, labels, default, update, updating: true);

    private double Backward(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, Span<float> gradient, GradientBlock? ready, bool updating)
    {
        Begin(parameters, n, labels, backward: true);
        int m = _layout.Out(0);
        fixed (float* p = parameters)
        fixed (float* g = gradient)
        {
            _p = p;
            _g = g;
            (_ready, _updating) = (ready, updating);
            _parallel.Run(m, _firstLayerRows);
            _parallel.Run(m, _laterLayers);
            _parallel.Run(m, _weightGradientRows);
            _ready = null;
            _p = _g = null;
        }
        return _own[0].Loss;
    }

    private void Begin(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, bool backward)
    {
        CheckBatch(n);
        if (parameters.Length != _layout.Length) throw new ArgumentException("parameters have the wrong length", nameof(parameters));
        if (labels.Length < n) throw new ArgumentException("fewer labels than samples", nameof(labels));
        if (_inputPerThread && n != _n) throw new ArgumentException($"{_n} samples were loaded, not {n}", nameof(n));
        // Checked here, on the caller's thread: the row threads must not throw.
        for (int i = 0; i < n; i++)
            if (labels[i] >= Spec.OutputSize) throw new ArgumentException($"label {labels[i]} is outside the model's {Spec.OutputSize} outputs");
        labels[..n].CopyTo(_labels);
        (_n, _mp, _backward) = (n, RoundUp(n), backward);
        if (!_inputPerThread) Transpose.Run(P(_own[0].X), n, Spec.InputSize, Spec.InputSize, P(_own[0].XT), _mp);
    }

    /// <summary>Index of the largest output of sample i after a forward pass.</summary>
    public int Predict(int i)
    {
        if ((uint)i >= (uint)_n) throw new ArgumentOutOfRangeException(nameof(i), $"sample {i} is outside the batch of {_n}");
        float* a = P(_own[0].ActT[^1]);
        int best = 0;
        for (int o = 1; o < Spec.OutputSize; o++)
            if (a[o * _mp + i] > a[best * _mp + i]) best = o;
        return best;
    }

    /// <summary>The copy of the input batch that thread <paramref name="thread"/> reads, loaded on first use.</summary>
    private ThreadBuffers Inputs(int thread)
    {
        if (!_inputPerThread) return _own[0];
        var own = _own[thread];
        if (own.LoadedVersion != _inputVersion)
        {
            int features = Spec.InputSize;
            _data!.CopyInputs(_indices.AsSpan(0, _n), new Span<float>(P(own.X), _n * features));
            Transpose.Run(P(own.X), _n, features, features, P(own.XT), _mp);
            own.LoadedVersion = _inputVersion;
        }
        return own;
    }

    /// <summary>Phase 1, units [from, to) of the first layer: actT[1] = f(W_0 · xᵀ + b_0).</summary>
    private void FirstLayerRows(int thread, int from, int to)
    {
        int inSize = _layout.In(0), mp = _mp;
        float* z = P(_act1T);
        new GemmJob(_isa, mp, inSize, _p + _layout.WeightOffset(0), inSize, 1, P(Inputs(thread).XT), mp, z, mp).Rows(from, to);
        AddBiasAndActivate(z + from * mp, to - from, mp, _p + _layout.BiasOffset(0) + from, _layout.LayerCount > 1 ? Spec.Activation : null);
    }

    /// <summary>
    /// Phase 2 on thread <paramref name="thread"/>, whose first-layer units are [from, to): the later layers
    /// forward and the cost; when training, BP1, BP2 down to deltaT[1], and BP2 for rows [from, to) of deltaT[0].
    /// </summary>
    private void LaterLayers(int thread, int from, int to)
    {
        var own = _own[thread];
        int L = _layout.LayerCount, n = _n, mp = _mp;
        if (L == 1) new ReadOnlySpan<float>(P(_act1T), Spec.OutputSize * mp).CopyTo(new Span<float>(P(own.ActT[1]), Spec.OutputSize * mp));
        else if (_backward) Transpose.Run(P(_act1T), _layout.Out(0), n, mp, P(own.Act[1]), _layout.Out(0));
        for (int l = 1; l < L; l++)
        {
            int inSize = _layout.In(l), outSize = _layout.Out(l);
            float* z = P(own.ActT[l + 1]);
            new GemmJob(_isa, mp, inSize, _p + _layout.WeightOffset(l), inSize, 1, ActT(own, l), mp, z, mp).Rows(0, outSize);
            bool hidden = l < L - 1;
            AddBiasAndActivate(z, outSize, mp, _p + _layout.BiasOffset(l), hidden ? Spec.Activation : null);
            if (hidden && _backward) Transpose.Run(z, outSize, n, mp, P(own.Act[l + 1]), outSize);
        }
        own.Loss = OutputAndLoss(own);
        if (!_backward) return;

        // BP1: δᴸ = a − y (softmax + cross-entropy), times σ'(z) for sigmoid + quadratic. Padding columns stay 0.
        float* aOut = P(own.ActT[L]), dOut = P(own.DeltaT[L - 1]);
        bool quadratic = Spec.Loss == Loss.Quadratic;
        for (int o = 0; o < Spec.OutputSize; o++)
        {
            float* a = aOut + o * mp, d = dOut + o * mp;
            for (int i = 0; i < n; i++)
            {
                float diff = a[i] - (_labels[i] == o ? 1f : 0f);
                d[i] = quadratic ? diff * (a[i] * (1f - a[i])) : diff;
            }
            for (int i = n; i < mp; i++) d[i] = 0f;
        }

        // BP2 with Wᵀ read in place through the strides; only this thread's rows of deltaT[0].
        for (int l = L - 1; l >= 1; l--)
        {
            int inSize = _layout.In(l), outSize = _layout.Out(l);
            var (r0, r1) = l == 1 ? (from, to) : (0, inSize);
            float* prev = P(own.DeltaT[l - 1]);
            new GemmJob(_isa, mp, outSize, _p + _layout.WeightOffset(l), 1, inSize, P(own.DeltaT[l]), mp, prev, mp).Rows(r0, r1);
            Activations.MultiplyByDerivative(Spec.Activation,
                new ReadOnlySpan<float>(ActT(own, l) + r0 * mp, (r1 - r0) * mp), new Span<float>(prev + r0 * mp, (r1 - r0) * mp));
        }
    }

    /// <summary>actT[l] as a thread reads it: its own xᵀ, the shared first-layer output, or its own later layers.</summary>
    private float* ActT(ThreadBuffers own, int l) => l == 0 ? P(own.XT) : l == 1 && _layout.LayerCount > 1 ? P(_act1T) : P(own.ActT[l]);

    /// <summary>Phase 3: BP3 and BP4 for this thread's rows of every layer; of the first layer, rows [from, to).</summary>
    private void WeightGradientRows(int thread, int from, int to)
    {
        var own = _own[thread];
        int parts = _parallel.PartsFor(_layout.Out(0));
        WeightGradient(own, 0, P(Inputs(thread).X), from, to, thread, parts);
        for (int l = 1; l < _layout.LayerCount; l++)
        {
            var (r0, r1) = LaterRows(l, thread, parts);
            if (r1 > r0) WeightGradient(own, l, P(own.Act[l]), r0, r1, thread, parts);
        }
    }

    /// <summary>The rows of layer l ≥ 1 that thread computes in phase 3 (none when the layer is too small to split).</summary>
    private (int From, int To) LaterRows(int l, int thread, int parts)
    {
        int outSize = _layout.Out(l), layerParts = Math.Min(parts, _parallel.PartsFor(outSize));
        return thread < layerParts ? RowParallel.Bounds(outSize, thread, layerParts) : (0, 0);
    }

    /// <summary>
    /// Rows [from, to) of layer l's BP3 and BP4, 4 rows (one register tile) at a time: into the gradient, or
    /// each block to the callback while it is in L1. Over the first layer's rows the thread also asks for
    /// the next batch's samples a few at a time (asked for all at once at the start of the step, a third
    /// were evicted from L2 again before use: a load took 10–18 µs against 9.5) and, when the callback
    /// updates parameters, takes ownership of the later layers' rows it will update (see <see cref="TakeLines"/>).
    /// </summary>
    private void WeightGradient(ThreadBuffers own, int l, float* act, int from, int to, int thread, int parts)
    {
        int inSize = _layout.In(l), mp = _mp, blocks = (to - from + 3) / 4, prefetched = 0;
        bool first = l == 0, prefetch = first && _inputPerThread && _nextCount > 0;
        var ready = _ready;
        float* delta = P(own.DeltaT[l]), block = P(own.Block);
        BiasGradient(delta + from * mp, to - from, mp, _n, ready is null ? _g + _layout.BiasOffset(l) + from : block);
        ready?.Invoke(_layout.BiasOffset(l) + from, new ReadOnlySpan<float>(block, to - from));
        for (int r = from, b = 1; r < to; r += 4, b++)
        {
            if (prefetch)
            {
                int upTo = (int)((long)_nextCount * b / blocks);
                _data!.Prefetch(_next.AsSpan(prefetched, upTo - prefetched));
                prefetched = upTo;
            }
            if (first && _updating && parts > 1) TakeLines(thread, parts, b, blocks);
            int rows = Math.Min(4, to - r);
            float* c = ready is null ? _g + _layout.WeightOffset(l) + r * inSize : block;
            new GemmJob(_isa, inSize, _n, delta + r * mp, mp, 1, act, inSize, c, inSize).Rows(0, rows);
            ready?.Invoke(_layout.WeightOffset(l) + r * inSize, new ReadOnlySpan<float>(block, rows * inSize));
        }
    }

    /// <summary>
    /// Share <paramref name="part"/>/<paramref name="parts"/> of the later layers' parameters that this
    /// thread's callbacks will update: each cache line rewritten with its own value. The other threads read
    /// those lines in phase 2, so the update must first take them back from their cores, ~0.5 µs a line
    /// when the vCPUs are far apart. A plain store does that in the background while the first layer's
    /// rows are computed; the updates themselves (two stores a value, parameter and velocity) filled the
    /// store buffer and stalled (medians of runs in far mode, (a) on 2 threads: 0.198 s an epoch without
    /// this, 0.186 with it, 0.194 with the updates spread out instead). Nothing reads these parameters in
    /// phase 3, and in this mode the caller lets the callback write them in place.
    /// </summary>
    private void TakeLines(int thread, int parts, int part, int partCount)
    {
        const int lineFloats = 16;
        for (int l = 1; l < _layout.LayerCount; l++)
        {
            var (r0, r1) = LaterRows(l, thread, parts);
            if (r1 <= r0) continue;
            int inSize = _layout.In(l);
            Touch(_p + _layout.WeightOffset(l) + r0 * inSize, (r1 - r0) * inSize);
            Touch(_p + _layout.BiasOffset(l) + r0, r1 - r0);
        }

        void Touch(float* values, int length)
        {
            int a = (int)((long)length * (part - 1) / partCount), e = (int)((long)length * part / partCount);
            for (int i = a; i < e; i += lineFloats) values[i] = values[i];
            if (part == partCount) values[length - 1] = values[length - 1];
        }
    }

    /// <summary>z[o, :] = f(z[o, :] + b[o]) for each row; ReLU is fused into one pass, the others use TensorPrimitives.</summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
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

    /// <summary>BP3: gB[o] = Σ_i δ[o, i], each sum in sample order; four rows at a time to overlap the chains.</summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
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

    /// <summary>The output activation from the logits in this thread's actT[L], in place, and the summed cost.</summary>
    private double OutputAndLoss(ThreadBuffers own)
    {
        int outputs = Spec.OutputSize, mp = _mp, n = _n;
        float* z = P(own.ActT[^1]);
        var labels = _labels;
        var rowLoss = own.RowLoss;
        if (Spec.Loss == Loss.Quadratic)
        {
            var all = new Span<float>(z, outputs * mp);
            TensorPrimitives.Sigmoid(all, all);
            for (int i = 0; i < n; i++)
            {
                double s = 0;
                for (int o = 0; o < outputs; o++) { double d = z[o * mp + i] - (labels[i] == o ? 1f : 0f); s += d * d; }
                rowLoss[i] = 0.5 * s;
            }
        }
        else
        {
            // Column-wise softmax, vectorised across samples (rows are contiguous over samples). The cost
            // comes from the logits (log-sum-exp) before they are overwritten by the probabilities.
            float* max = P(own.Scratch), sum = max + mp;
            new Span<float>(z, mp).CopyTo(new Span<float>(max, mp));
            for (int o = 1; o < outputs; o++)
                TensorPrimitives.Max(new ReadOnlySpan<float>(max, mp), new ReadOnlySpan<float>(z + o * mp, mp), new Span<float>(max, mp));
            for (int i = 0; i < n; i++) rowLoss[i] = max[i] - z[labels[i] * mp + i];
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
            for (int i = 0; i < n; i++) rowLoss[i] += Math.Log(sum[i]);
        }
        double loss = 0;
        for (int i = 0; i < n; i++) loss += rowLoss[i];
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

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float* P(float[] pinned) => (float*)(((nint)Unsafe.AsPointer(ref pinned[0]) + 63) & ~(nint)63);

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
