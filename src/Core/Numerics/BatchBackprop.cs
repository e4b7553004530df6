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
///   x, xᵀ      n × in_0, in_0 × mp   the input batch, one copy per thread (see LoadInputs)
///   actT[l]    in_l × mp      actT[0] = xᵀ;  actT[l+1] = f(W_l · actT[l] + b_l)          (forward)
///   act[l]     n × in_l       sample-major copy of actT[l] (l ≥ 1), the right-hand side of BP4
///   deltaT[l]  out_l × mp     ∂C/∂z of layer l per sample; padding columns are zero
///   gW_l       out × in       = deltaT[l] · act[l]                                       (BP4)
///   gb_l       out            = Σ_i deltaT[l][:, i]                                      (BP3)
///   deltaT[l-1]               = (W_lᵀ · deltaT[l]) ⊙ f'(actT[l])                         (BP2)
/// The gradient is the sum over the batch, not the mean: the server divides.
///
/// Each product runs with its element-wise follow-up (bias and activation, bias gradient, f') on the same
/// rows in the same thread, while they are in cache. Every output element is a fixed-order sum (see
/// <see cref="Gemm"/>), and threads split rows, never samples, so results are bit-identical for any
/// thread count.
/// </summary>
public sealed unsafe class BatchBackprop : IDisposable
{
    private const int Pad = 16;
    private readonly ParameterLayout _layout;
    private readonly Gemm.Isa _isa;
    private readonly RowParallel _parallel;
    private readonly float[][] _x, _xT;
    private readonly int[] _loadedVersion;
    private readonly float[][] _actT;
    private readonly float[][] _act;
    private readonly float[][] _deltaT;
    private readonly double[] _rowLoss;
    private readonly int[] _indices, _next;
    private readonly float[] _scratch;
    private readonly float[][] _block;
    private readonly Action<int, int, int> _forwardRows, _weightGradientRows;
    private readonly Action<int, int> _inputGradientRows;

    // The operation in progress, read by the row delegates on every thread.
    private int _n, _mp, _layer, _inputVersion, _nextCount;
    private bool _inputPerThread, _keepSampleMajor;
    private float* _p, _g;
    private Dataset? _data;
    private GradientBlock? _ready;

    public BatchBackprop(ModelSpec spec, int maxBatch, int threads = 1, Gemm.Isa? isa = null)
    {
        if (maxBatch < 1) throw new ArgumentOutOfRangeException(nameof(maxBatch));
        Spec = spec;
        MaxBatch = maxBatch;
        _layout = new ParameterLayout(spec);
        _isa = isa ?? Gemm.Best;
        _parallel = new RowParallel(threads);
        int mpMax = RoundUp(maxBatch);
        _x = Enumerable.Range(0, threads).Select(_ => Pinned(maxBatch * spec.InputSize)).ToArray();
        _xT = Enumerable.Range(0, threads).Select(_ => Pinned(spec.InputSize * mpMax)).ToArray();
        _loadedVersion = new int[threads];
        _actT = spec.Layers.Select((size, l) => l == 0 ? [] : Pinned(size * mpMax)).ToArray();
        _act = spec.Layers.Select((size, l) => l == 0 ? [] : Pinned(maxBatch * size)).ToArray();
        _deltaT = spec.Layers.Skip(1).Select(size => Pinned(size * mpMax)).ToArray();
        _rowLoss = new double[maxBatch];
        _indices = new int[maxBatch];
        _next = new int[maxBatch];
        _scratch = Pinned(2 * mpMax);
        int blockLength = Math.Max(4 * spec.Layers[..^1].Max(), spec.Layers[1..].Max());
        _block = Enumerable.Range(0, threads).Select(_ => Pinned(blockLength)).ToArray();
        _forwardRows = ForwardRows;
        _weightGradientRows = WeightGradientRows;
        _inputGradientRows = InputGradientRows;
    }

    public ModelSpec Spec { get; }
    public int MaxBatch { get; }
    public ParameterLayout Layout => _layout;
    public RowParallel Parallel => _parallel;

    /// <summary>The input rows (n × in_0, sample-major) to fill by hand before <see cref="Forward"/> or <see cref="GradientSum"/>; all threads read this one copy.</summary>
    public Span<float> Input(int n)
    {
        (_inputPerThread, _data) = (false, null);
        return new Span<float>(P(_x[0]), CheckBatch(n) * Spec.InputSize);
    }

    /// <summary>
    /// Takes the samples at <paramref name="indices"/> as the input batch (scaled to [0, 1]). Each thread
    /// loads the whole batch into its own copy when its first-layer rows need it: a copy shared between
    /// cores would cost a cross-core invalidation per cache line on every step. Then it asks its core to
    /// start fetching the samples at <paramref name="next"/> (the next batch, if known): random samples
    /// are cache misses otherwise, and each core needs them in its own cache.
    /// </summary>
    public void LoadInputs(Dataset data, ReadOnlySpan<int> indices, ReadOnlySpan<int> next = default)
    {
        int n = CheckBatch(indices.Length);
        if (data.Features != Spec.InputSize) throw new ArgumentException($"{data.Name} has {data.Features} features; the model takes {Spec.InputSize}");
        indices.CopyTo(_indices);
        _nextCount = Math.Min(next.Length, MaxBatch);
        next[.._nextCount].CopyTo(_next);
        (_data, _n, _mp, _inputPerThread) = (data, n, RoundUp(n), true);
        _inputVersion++;
    }

    /// <summary>Forward pass over the n input rows; returns the summed cost against the labels.</summary>
    public double Forward(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels) => Forward(parameters, n, labels, keepSampleMajor: false);

    private double Forward(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, bool keepSampleMajor)
    {
        CheckBatch(n);
        if (parameters.Length != _layout.Length) throw new ArgumentException("parameters have the wrong length", nameof(parameters));
        if (labels.Length < n) throw new ArgumentException("fewer labels than samples", nameof(labels));
        if (_inputPerThread && n != _n) throw new ArgumentException($"{_n} samples were loaded, not {n}", nameof(n));
        (_n, _mp, _keepSampleMajor) = (n, RoundUp(n), keepSampleMajor);
        if (!_inputPerThread) Transpose.Run(P(_x[0]), n, Spec.InputSize, Spec.InputSize, P(_xT[0]), _mp);
        fixed (float* p = parameters)
        {
            _p = p;
            for (_layer = 0; _layer < _layout.LayerCount; _layer++) _parallel.Run(_layout.Out(_layer), _forwardRows);
            _p = null;
        }
        return OutputAndLoss(n, labels);
    }

    /// <summary>
    /// Writes Σ_samples ∂C/∂θ into <paramref name="gradient"/> (overwritten, flat layout) and returns the
    /// summed cost. The inputs must already be loaded (<see cref="LoadInputs"/> or <see cref="Input"/>).
    /// </summary>
    public double GradientSum(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, Span<float> gradient)
    {
        if (gradient.Length != _layout.Length) throw new ArgumentException("gradient has the wrong length", nameof(gradient));
        return Backward(parameters, n, labels, gradient, null);
    }

    /// <summary>
    /// The same sum, not written anywhere: each block of it goes to <paramref name="ready"/> as soon as it
    /// is final, from the thread that computed it, while it is still in that core's L1 (blocks of up to 4
    /// weight rows, and each thread's run of biases). Layer l's weights are no longer read once its blocks
    /// are reported, so the callback may update the parameters in place: a one-chunk step applies its
    /// optimizer this way, and the whole gradient never goes through memory.
    /// </summary>
    public double GradientSum(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, GradientBlock ready) =>
        Backward(parameters, n, labels, default, ready);

    private double Backward(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, Span<float> gradient, GradientBlock? ready)
    {
        double loss = Forward(parameters, n, labels, keepSampleMajor: true);
        int mp = _mp, L = _layout.LayerCount, outputs = Spec.OutputSize;

        // BP1: δᴸ = a − y (softmax + cross-entropy), times σ'(z) for sigmoid + quadratic. Padding columns stay 0.
        float* aOut = P(_actT[L]), dOut = P(_deltaT[L - 1]);
        for (int o = 0; o < outputs; o++)
        {
            float* a = aOut + o * mp, d = dOut + o * mp;
            for (int i = 0; i < n; i++)
            {
                float diff = a[i] - (labels[i] == o ? 1f : 0f);
                d[i] = Spec.Loss == Loss.Quadratic ? diff * (a[i] * (1f - a[i])) : diff;
            }
            for (int i = n; i < mp; i++) d[i] = 0f;
        }

        fixed (float* p = parameters)
        fixed (float* g = gradient)
        {
            _p = p;
            _g = g;
            _ready = ready;
            for (_layer = L - 1; _layer >= 0; _layer--)
            {
                // BP2 before BP4: BP2 reads W_l, which a ready callback may change once BP4 reports it.
                if (_layer > 0) _parallel.Run(_layout.In(_layer), _inputGradientRows);
                _parallel.Run(_layout.Out(_layer), _weightGradientRows);
            }
            _ready = null;
            _p = null;
            _g = null;
        }
        return loss;
    }

    /// <summary>Index of the largest output of sample i after a forward pass.</summary>
    public int Predict(int i)
    {
        float* a = P(_actT[^1]);
        int best = 0;
        for (int o = 1; o < Spec.OutputSize; o++)
            if (a[o * _mp + i] > a[best * _mp + i]) best = o;
        return best;
    }

    /// <summary>The copy of the input batch (x and xᵀ) that thread <paramref name="thread"/> reads, loaded on first use.</summary>
    private int InputSlot(int thread)
    {
        int slot = _inputPerThread ? thread : 0;
        if (_inputPerThread && _loadedVersion[slot] != _inputVersion)
        {
            int features = Spec.InputSize;
            _data!.CopyInputs(_indices.AsSpan(0, _n), new Span<float>(P(_x[slot]), _n * features));
            Transpose.Run(P(_x[slot]), _n, features, features, P(_xT[slot]), _mp);
            _loadedVersion[slot] = _inputVersion;
            _data.Prefetch(_next.AsSpan(0, _nextCount));
        }
        return slot;
    }

    /// <summary>Units [from, to) of layer _layer: z = W·a_prev + b, then f, then (for BP4 later) the sample-major copy.</summary>
    private void ForwardRows(int thread, int from, int to)
    {
        int l = _layer, inSize = _layout.In(l), outSize = _layout.Out(l), mp = _mp;
        float* z = P(_actT[l + 1]);
        float* aPrev = l == 0 ? P(_xT[InputSlot(thread)]) : P(_actT[l]);
        new GemmJob(_isa, mp, inSize, _p + _layout.WeightOffset(l), inSize, 1, aPrev, mp, z, mp).Rows(from, to);
        bool hidden = l < _layout.LayerCount - 1;
        AddBiasAndActivate(z + from * mp, to - from, mp, _p + _layout.BiasOffset(l) + from, hidden ? Spec.Activation : null);
        if (hidden && _keepSampleMajor) Transpose.Run(z + from * mp, to - from, _n, mp, P(_act[l + 1]) + from, outSize);
    }

    /// <summary>Units [from, to) of layer _layer: BP3 and BP4.</summary>
    private void WeightGradientRows(int thread, int from, int to)
    {
        int l = _layer, inSize = _layout.In(l), mp = _mp;
        float* delta = P(_deltaT[l]);
        float* act = l == 0 ? P(_x[InputSlot(thread)]) : P(_act[l]);
        if (_ready is not { } ready)
        {
            BiasGradient(delta + from * mp, to - from, mp, _n, _g + _layout.BiasOffset(l) + from);
            new GemmJob(_isa, inSize, _n, delta, mp, 1, act, inSize, _g + _layout.WeightOffset(l), inSize).Rows(from, to);
            return;
        }
        // Into this thread's block buffer, 4 rows (one register tile) at a time, reported while in L1.
        float* block = P(_block[thread]);
        BiasGradient(delta + from * mp, to - from, mp, _n, block);
        ready(_layout.BiasOffset(l) + from, new ReadOnlySpan<float>(block, to - from));
        for (int r = from; r < to; r += 4)
        {
            int rows = Math.Min(4, to - r);
            new GemmJob(_isa, inSize, _n, delta + r * mp, mp, 1, act, inSize, block, inSize).Rows(0, rows);
            ready(_layout.WeightOffset(l) + r * inSize, new ReadOnlySpan<float>(block, rows * inSize));
        }
    }

    /// <summary>Inputs [from, to) of layer _layer: BP2, with Wᵀ read in place through the strides.</summary>
    private void InputGradientRows(int from, int to)
    {
        int l = _layer, inSize = _layout.In(l), outSize = _layout.Out(l), mp = _mp;
        float* prev = P(_deltaT[l - 1]);
        new GemmJob(_isa, mp, outSize, _p + _layout.WeightOffset(l), 1, inSize, P(_deltaT[l]), mp, prev, mp).Rows(from, to);
        Activations.MultiplyByDerivative(Spec.Activation,
            new ReadOnlySpan<float>(P(_actT[l]) + from * mp, (to - from) * mp), new Span<float>(prev + from * mp, (to - from) * mp));
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

    private double OutputAndLoss(int n, ReadOnlySpan<byte> labels)
    {
        int outputs = Spec.OutputSize, mp = _mp;
        float* z = P(_actT[^1]);
        for (int i = 0; i < n; i++)
            if (labels[i] >= outputs) throw new ArgumentException($"label {labels[i]} is outside the model's {outputs} outputs");
        if (Spec.Loss == Loss.Quadratic)
        {
            var all = new Span<float>(z, outputs * mp);
            TensorPrimitives.Sigmoid(all, all);
            for (int i = 0; i < n; i++)
            {
                double s = 0;
                for (int o = 0; o < outputs; o++) { double d = z[o * mp + i] - (labels[i] == o ? 1f : 0f); s += d * d; }
                _rowLoss[i] = 0.5 * s;
            }
        }
        else
        {
            // Column-wise softmax, vectorised across samples (rows are contiguous over samples). The cost
            // comes from the logits (log-sum-exp) before they are overwritten by the probabilities.
            float* max = P(_scratch), sum = max + mp;
            new Span<float>(z, mp).CopyTo(new Span<float>(max, mp));
            for (int o = 1; o < outputs; o++)
                TensorPrimitives.Max(new ReadOnlySpan<float>(max, mp), new ReadOnlySpan<float>(z + o * mp, mp), new Span<float>(max, mp));
            for (int i = 0; i < n; i++) _rowLoss[i] = max[i] - z[labels[i] * mp + i];
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
            for (int i = 0; i < n; i++) _rowLoss[i] += Math.Log(sum[i]);
        }
        double loss = 0;
        for (int i = 0; i < n; i++) loss += _rowLoss[i];
        return loss;
    }

    public void Dispose() => _parallel.Dispose();

    private static int RoundUp(int n) => (n + Pad - 1) / Pad * Pad;

    // Buffers start on a cache line: a vector load that straddles two lines costs two, and two threads
    // writing either side of a row-split boundary must not share a line (.NET aligns arrays to 8 bytes).
    private const int LineFloats = 16;

    private static float[] Pinned(int length) => GC.AllocateArray<float>(Math.Max(length, 1) + LineFloats - 1, pinned: true);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float* P(float[] pinned) => (float*)(((nint)Unsafe.AsPointer(ref pinned[0]) + 63) & ~(nint)63);

    private int CheckBatch(int n)
    {
        if (n < 1 || n > MaxBatch) throw new ArgumentOutOfRangeException(nameof(n), $"batch {n} is outside 1..{MaxBatch}");
        return n;
    }
}
