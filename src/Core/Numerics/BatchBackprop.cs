using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using Backprop.Core.Model;

namespace Backprop.Core.Numerics;

/// <summary>
/// Batched forward and backward passes over one chunk of samples, in float, on spans over the flat
/// parameter vector. Buffers are allocated (pinned) once for <c>maxBatch</c>; a step allocates nothing.
///
/// Activations and deltas are kept feature-major — one row per unit, one column per sample, rows padded
/// to mp = n rounded up to 16 — so every product is a <see cref="Gemm"/> over contiguous rows:
///   x          n × in_0       the input batch, sample-major (filled through <see cref="Input"/>)
///   actT[l]    in_l × mp      actT[0] = xᵀ;  actT[l+1] = f(W_l · actT[l] + b_l)          (forward)
///   deltaT[l]  out_l × mp     ∂C/∂z of layer l per sample; padding columns are zero
///   gW_l       out × in       = deltaT[l] · act_l   (act_l: sample-major copy of actT[l])   (BP4)
///   gb_l       out            = Σ_i deltaT[l][:, i]                                      (BP3)
///   deltaT[l-1]               = (W_lᵀ · deltaT[l]) ⊙ f'(actT[l])                         (BP2)
/// The gradient is the sum over the batch, not the mean: the server divides.
///
/// Every output element is a fixed-order sum (see <see cref="Gemm"/>), so results are bit-identical for
/// any thread count: threads split the rows of each product, never the samples.
/// </summary>
public sealed unsafe class BatchBackprop : IDisposable
{
    private const int Pad = 16;
    private readonly ParameterLayout _layout;
    private readonly Gemm.Isa _isa;
    private readonly RowParallel _parallel;
    private readonly float[] _x;
    private readonly float[][] _actT;
    private readonly float[][] _actS;
    private readonly float[][] _deltaT;
    private readonly double[] _rowLoss;
    private int _mp;
    private GemmJob _gemm;
    private readonly Action<int, int> _gemmRows;

    public BatchBackprop(ModelSpec spec, int maxBatch, int threads = 1, Gemm.Isa? isa = null)
    {
        if (maxBatch < 1) throw new ArgumentOutOfRangeException(nameof(maxBatch));
        Spec = spec;
        MaxBatch = maxBatch;
        _layout = new ParameterLayout(spec);
        _isa = isa ?? Gemm.Best;
        _parallel = new RowParallel(threads);
        _gemmRows = (from, to) => _gemm.Rows(from, to);
        int mpMax = RoundUp(maxBatch);
        _x = Pinned(maxBatch * spec.InputSize);
        _actT = spec.Layers.Select(size => Pinned(size * mpMax)).ToArray();
        _actS = spec.Layers.Select((size, l) => l == 0 ? [] : Pinned(maxBatch * size)).ToArray();
        _deltaT = spec.Layers.Skip(1).Select(size => Pinned(size * mpMax)).ToArray();
        _rowLoss = new double[maxBatch];
    }

    public ModelSpec Spec { get; }
    public int MaxBatch { get; }
    public ParameterLayout Layout => _layout;
    public int Threads => _parallel.Threads;
    public RowParallel Parallel => _parallel;

    /// <summary>The input rows (n × in_0, sample-major) to fill before <see cref="Forward"/> or <see cref="GradientSum"/>.</summary>
    public Span<float> Input(int n) => _x.AsSpan(0, CheckBatch(n) * Spec.InputSize);

    /// <summary>Forward pass over the n input rows; returns the summed cost against the labels.</summary>
    public double Forward(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels)
    {
        CheckBatch(n);
        if (parameters.Length != _layout.Length) throw new ArgumentException("parameters have the wrong length", nameof(parameters));
        int mp = _mp = RoundUp(n);
        ToFeatureMajor(P(_x), n, Spec.InputSize, P(_actT[0]), mp);
        fixed (float* p = parameters)
        {
            for (int l = 0; l < _layout.LayerCount; l++)
            {
                int inSize = _layout.In(l), outSize = _layout.Out(l);
                float* w = p + _layout.WeightOffset(l), bias = p + _layout.BiasOffset(l);
                float* x = P(_actT[l]), z = P(_actT[l + 1]);
                Multiply(new GemmJob(_isa, outSize, mp, inSize, w, inSize, 1, x, mp, z, mp));
                AddBiasAndActivate(z, outSize, mp, bias, l < _layout.LayerCount - 1 ? Spec.Activation : null);
            }
        }
        return OutputAndLoss(n, labels);
    }

    /// <summary>
    /// Writes Σ_samples ∂C/∂θ into <paramref name="gradient"/> (overwritten, flat layout) and returns the
    /// summed cost. The inputs must already be in <see cref="Input"/>.
    /// </summary>
    public double GradientSum(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels, Span<float> gradient)
    {
        if (gradient.Length != _layout.Length) throw new ArgumentException("gradient has the wrong length", nameof(gradient));
        double loss = Forward(parameters, n, labels);
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
            for (int l = L - 1; l >= 0; l--)
            {
                int inSize = _layout.In(l), outSize = _layout.Out(l);
                float* delta = P(_deltaT[l]);
                float* gW = g + _layout.WeightOffset(l), gB = g + _layout.BiasOffset(l);

                BiasGradient(delta, outSize, mp, n, gB);

                // BP4: gW = δ · act (k = n samples), act sample-major.
                float* act = l == 0 ? P(_x) : P(_actS[l]);
                if (l > 0) ToSampleMajor(P(_actT[l]), inSize, mp, n, act);
                Multiply(new GemmJob(_isa, outSize, inSize, n, delta, mp, 1, act, inSize, gW, inSize));

                if (l == 0) break;

                // BP2: δprev = (Wᵀ · δ) ⊙ f'(a_prev); Wᵀ is read in place through the strides.
                float* w = p + _layout.WeightOffset(l), prev = P(_deltaT[l - 1]);
                Multiply(new GemmJob(_isa, inSize, mp, outSize, w, 1, inSize, delta, mp, prev, mp));
                Activations.MultiplyByDerivative(Spec.Activation, new ReadOnlySpan<float>(P(_actT[l]), inSize * mp), new Span<float>(prev, inSize * mp));
            }
        }
        return loss;
    }

    private void Multiply(GemmJob job)
    {
        _gemm = job;
        _parallel.Run(job.M, _gemmRows);
    }

    /// <summary>z[o, :] = f(z[o, :] + b[o]) for each row; ReLU is fused into one pass, the others use TensorPrimitives.</summary>
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

    /// <summary>Index of the largest output of sample i after a forward pass.</summary>
    public int Predict(int i)
    {
        float* a = P(_actT[^1]);
        int best = 0;
        for (int o = 1; o < Spec.OutputSize; o++)
            if (a[o * _mp + i] > a[best * _mp + i]) best = o;
        return best;
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
            // Column-wise softmax; the cost comes from the logits (log-sum-exp) before they are overwritten.
            for (int i = 0; i < n; i++)
            {
                float max = z[i];
                for (int o = 1; o < outputs; o++) max = MathF.Max(max, z[o * mp + i]);
                float zLabel = z[labels[i] * mp + i];
                double sum = 0;
                for (int o = 0; o < outputs; o++) { float e = MathF.Exp(z[o * mp + i] - max); z[o * mp + i] = e; sum += e; }
                float inv = (float)(1.0 / sum);
                for (int o = 0; o < outputs; o++) z[o * mp + i] *= inv;
                _rowLoss[i] = max + Math.Log(sum) - zLabel;
            }
        }
        double loss = 0;
        for (int i = 0; i < n; i++) loss += _rowLoss[i];
        return loss;
    }

    /// <summary>x (n × features, sample-major) → xT (features × mp).</summary>
    private static void ToFeatureMajor(float* x, int n, int features, float* xT, int mp) => Transpose.Run(x, n, features, features, xT, mp);

    /// <summary>aT (features × mp, feature-major) → a (n × features).</summary>
    private static void ToSampleMajor(float* aT, int features, int mp, int n, float* a) => Transpose.Run(aT, features, n, mp, a, features);

    public void Dispose() => _parallel.Dispose();

    private static int RoundUp(int n) => (n + Pad - 1) / Pad * Pad;

    private static float[] Pinned(int length) => GC.AllocateArray<float>(Math.Max(length, 1), pinned: true);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float* P(float[] pinned) => (float*)Unsafe.AsPointer(ref pinned[0]);

    private int CheckBatch(int n)
    {
        if (n < 1 || n > MaxBatch) throw new ArgumentOutOfRangeException(nameof(n), $"batch {n} is outside 1..{MaxBatch}");
        return n;
    }
}
