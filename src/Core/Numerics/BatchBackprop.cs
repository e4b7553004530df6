using System.Numerics.Tensors;
using Backprop.Core.Model;

namespace Backprop.Core.Numerics;

/// <summary>
/// Batched forward and backward passes over one chunk of samples, in float, on spans over the flat
/// parameter vector. All buffers are sized once for <c>maxBatch</c>; a step allocates nothing.
///
/// Shapes (n = batch, layer l maps in_l → out_l):
///   acts[0]   n × in_0         the input batch (filled by the caller through <see cref="Input"/>)
///   acts[l+1] n × out_l        a = f(a_prev · Wᵀ + b)
///   deltas[l] n × out_l        ∂C/∂z of layer l, per sample
///   grad      flat             Σ over the batch of ∂C/∂θ (not the mean: the server divides)
///
/// Results depend only on the inputs: every sum runs in a fixed order, so a chunk's gradient sum is
/// bit-identical wherever it is computed.
/// </summary>
public sealed class BatchBackprop
{
    private readonly ParameterLayout _layout;
    private readonly float[][] _acts;
    private readonly float[][] _deltas;
    private readonly double[] _rowLoss;

    public BatchBackprop(ModelSpec spec, int maxBatch)
    {
        if (maxBatch < 1) throw new ArgumentOutOfRangeException(nameof(maxBatch));
        Spec = spec;
        MaxBatch = maxBatch;
        _layout = new ParameterLayout(spec);
        _acts = spec.Layers.Select(size => new float[maxBatch * size]).ToArray();
        _deltas = spec.Layers.Skip(1).Select(size => new float[maxBatch * size]).ToArray();
        _rowLoss = new double[maxBatch];
    }

    public ModelSpec Spec { get; }
    public int MaxBatch { get; }
    public ParameterLayout Layout => _layout;

    /// <summary>The input rows (n × in_0) to fill before <see cref="Forward"/> or <see cref="GradientSum"/>.</summary>
    public Span<float> Input(int n) => _acts[0].AsSpan(0, CheckBatch(n) * Spec.InputSize);

    /// <summary>The outputs (n × out) after a forward pass: sigmoid activations or softmax probabilities.</summary>
    public ReadOnlySpan<float> Output(int n) => _acts[^1].AsSpan(0, n * Spec.OutputSize);

    /// <summary>Forward pass over the n input rows; returns the summed cost against the labels.</summary>
    public double Forward(ReadOnlySpan<float> parameters, int n, ReadOnlySpan<byte> labels)
    {
        CheckBatch(n);
        int L = _layout.LayerCount;
        for (int l = 0; l < L; l++)
        {
            int inSize = _layout.In(l), outSize = _layout.Out(l);
            var w = _layout.W(parameters, l);
            var b = _layout.B(parameters, l);
            var x = _acts[l].AsSpan(0, n * inSize);
            var y = _acts[l + 1].AsSpan(0, n * outSize);
            for (int i = 0; i < n; i++)
            {
                var xi = x.Slice(i * inSize, inSize);
                var yi = y.Slice(i * outSize, outSize);
                for (int o = 0; o < outSize; o++)
                    yi[o] = TensorPrimitives.Dot(xi, w.Slice(o * inSize, inSize)) + b[o];
            }
            if (l < L - 1) Activations.Apply(Spec.Activation, y);
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
        gradient.Clear();
        int L = _layout.LayerCount;

        // BP1: output delta.
        int outputs = Spec.OutputSize;
        var aOut = _acts[L].AsSpan(0, n * outputs);
        var dOut = _deltas[L - 1].AsSpan(0, n * outputs);
        aOut.CopyTo(dOut);
        for (int i = 0; i < n; i++) dOut[i * outputs + labels[i]] -= 1f;
        if (Spec.Loss == Loss.Quadratic) Activations.MultiplyByDerivative(Activation.Sigmoid, aOut, dOut);

        for (int l = L - 1; l >= 0; l--)
        {
            int inSize = _layout.In(l), outSize = _layout.Out(l);
            var delta = _deltas[l].AsSpan(0, n * outSize);
            var aPrev = _acts[l].AsSpan(0, n * inSize);
            var gW = _layout.W(gradient, l);
            var gB = _layout.B(gradient, l);

            // BP3: gB = Σ_i δ[i,:]
            for (int i = 0; i < n; i++) TensorPrimitives.Add(gB, delta.Slice(i * outSize, outSize), gB);

            // BP4: gW[o,:] = Σ_i δ[i,o] · aPrev[i,:]   (rows of gW are independent; the sum over i runs in order)
            for (int o = 0; o < outSize; o++)
            {
                var row = gW.Slice(o * inSize, inSize);
                for (int i = 0; i < n; i++)
                {
                    float d = delta[i * outSize + o];
                    if (d != 0f) TensorPrimitives.MultiplyAdd(aPrev.Slice(i * inSize, inSize), d, row, row);
                }
            }

            if (l == 0) break;

            // BP2: δprev[i,:] = (Σ_o δ[i,o] · W[o,:]) ⊙ f'(aPrev[i,:])
            var w = _layout.W(parameters, l);
            var deltaPrev = _deltas[l - 1].AsSpan(0, n * inSize);
            deltaPrev.Clear();
            for (int i = 0; i < n; i++)
            {
                var dst = deltaPrev.Slice(i * inSize, inSize);
                for (int o = 0; o < outSize; o++)
                {
                    float d = delta[i * outSize + o];
                    if (d != 0f) TensorPrimitives.MultiplyAdd(w.Slice(o * inSize, inSize), d, dst, dst);
                }
            }
            Activations.MultiplyByDerivative(Spec.Activation, aPrev, deltaPrev);
        }
        return loss;
    }

    /// <summary>Index of the largest output of row i after a forward pass.</summary>
    public int Predict(int i)
    {
        var row = _acts[^1].AsSpan(i * Spec.OutputSize, Spec.OutputSize);
        return TensorPrimitives.IndexOfMax(row);
    }

    private double OutputAndLoss(int n, ReadOnlySpan<byte> labels)
    {
        int outputs = Spec.OutputSize;
        var z = _acts[^1].AsSpan(0, n * outputs);
        for (int i = 0; i < n; i++)
        {
            int label = labels[i];
            if ((uint)label >= (uint)outputs)
                throw new ArgumentException($"label {label} is outside the model's {outputs} outputs");
            var row = z.Slice(i * outputs, outputs);
            if (Spec.Loss == Loss.Quadratic)
            {
                TensorPrimitives.Sigmoid(row, row);
                double s = 0;
                for (int k = 0; k < outputs; k++) { double d = row[k] - (k == label ? 1f : 0f); s += d * d; }
                _rowLoss[i] = 0.5 * s;
            }
            else
            {
                // log-sum-exp from the logits before they are overwritten by the probabilities.
                float max = TensorPrimitives.Max(row);
                float zLabel = row[label];
                double sum = 0;
                for (int k = 0; k < outputs; k++) { float e = MathF.Exp(row[k] - max); row[k] = e; sum += e; }
                float inv = (float)(1.0 / sum);
                TensorPrimitives.Multiply(row, inv, row);
                _rowLoss[i] = max + Math.Log(sum) - zLabel;
            }
        }
        double loss = 0;
        for (int i = 0; i < n; i++) loss += _rowLoss[i];
        return loss;
    }

    private int CheckBatch(int n)
    {
        if (n < 1 || n > MaxBatch) throw new ArgumentOutOfRangeException(nameof(n), $"batch {n} is outside 1..{MaxBatch}");
        return n;
    }
}
