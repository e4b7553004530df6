using Backprop.Core.Model;
using MathNet.Numerics.LinearAlgebra;

namespace Backprop.Core.Numerics;

/// <summary>
/// The oracle: the seed's backpropagation, one sample at a time, in double precision, written to read like
/// the four equations. Slow on purpose; tests hold the fast path to it.
///   BP1  δᴸ = ∇ₐC ⊙ σ'(zᴸ)             (softmax + cross-entropy: δᴸ = aᴸ − y)
///   BP2  δˡ = ((Wˡ⁺¹)ᵀ δˡ⁺¹) ⊙ σ'(zˡ)
///   BP3  ∂C/∂bˡ = δˡ
///   BP4  ∂C/∂Wˡ = δˡ (aˡ⁻¹)ᵀ
/// </summary>
public static class ReferenceBackprop
{
    private static readonly VectorBuilder<double> V = Vector<double>.Build;
    private static readonly MatrixBuilder<double> M = Matrix<double>.Build;

    /// <summary>Sum over the samples of ∂C/∂θ, in the flat layout; also returns the summed cost.</summary>
    public static (double[] Gradient, double LossSum) GradientSum(
        ModelSpec spec, ReadOnlySpan<double> parameters, IReadOnlyList<(float[] X, int Label)> samples)
    {
        var layout = new ParameterLayout(spec);
        var (weights, biases) = Unpack(layout, parameters);
        int L = layout.LayerCount;
        var gradW = weights.Select(w => M.Dense(w.RowCount, w.ColumnCount)).ToArray();
        var gradB = biases.Select(b => V.Dense(b.Count)).ToArray();
        double lossSum = 0;

        foreach (var (x, label) in samples)
        {
            // Forward, keeping every z and a.
            var a = new Vector<double>[L + 1];
            var z = new Vector<double>[L];
            a[0] = V.Dense(x.Length, i => x[i]);
            for (int l = 0; l < L; l++)
            {
                z[l] = weights[l] * a[l] + biases[l];
                a[l + 1] = l < L - 1 ? z[l].Map(v => Activations.Scalar(spec.Activation, v)) : Output(spec.Loss, z[l]);
            }
            var y = V.Dense(spec.OutputSize, i => i == label ? 1.0 : 0.0);
            lossSum += Cost(spec.Loss, a[L], z[L - 1], label);

            // BP1
            var delta = spec.Loss == Loss.Quadratic
                ? (a[L] - y).PointwiseMultiply(z[L - 1].Map(v => Activations.ScalarDerivative(Activation.Sigmoid, v)))
                : a[L] - y;
            for (int l = L - 1; l >= 0; l--)
            {
                gradB[l] += delta;                               // BP3
                gradW[l] += delta.OuterProduct(a[l]);            // BP4
                if (l > 0)                                       // BP2
                    delta = (weights[l].TransposeThisAndMultiply(delta))
                        .PointwiseMultiply(z[l - 1].Map(v => Activations.ScalarDerivative(spec.Activation, v)));
            }
        }
        return (Pack(layout, gradW, gradB), lossSum);
    }

    /// <summary>Summed cost only: the function that finite differences differentiate.</summary>
    public static double LossSum(ModelSpec spec, ReadOnlySpan<double> parameters, IReadOnlyList<(float[] X, int Label)> samples)
    {
        var layout = new ParameterLayout(spec);
        var (weights, biases) = Unpack(layout, parameters);
        double sum = 0;
        foreach (var (x, label) in samples)
        {
            var a = V.Dense(x.Length, i => x[i]);
            Vector<double> z = a;
            for (int l = 0; l < layout.LayerCount; l++)
            {
                z = weights[l] * a + biases[l];
                a = l < layout.LayerCount - 1 ? z.Map(v => Activations.Scalar(spec.Activation, v)) : Output(spec.Loss, z);
            }
            sum += Cost(spec.Loss, a, z, label);
        }
        return sum;
    }

    private static Vector<double> Output(Loss loss, Vector<double> z)
    {
        if (loss == Loss.Quadratic) return z.Map(v => Activations.Scalar(Activation.Sigmoid, v));
        double max = z.Maximum();
        var e = z.Map(v => Math.Exp(v - max));
        return e / e.Sum();
    }

    private static double Cost(Loss loss, Vector<double> a, Vector<double> z, int label)
    {
        if (loss == Loss.Quadratic)
        {
            double s = 0;
            for (int i = 0; i < a.Count; i++) { double d = a[i] - (i == label ? 1 : 0); s += d * d; }
            return 0.5 * s;
        }
        double max = z.Maximum();
        return max + Math.Log(z.Map(v => Math.Exp(v - max)).Sum()) - z[label];
    }

    private static (Matrix<double>[] W, Vector<double>[] B) Unpack(ParameterLayout layout, ReadOnlySpan<double> p)
    {
        var w = new Matrix<double>[layout.LayerCount];
        var b = new Vector<double>[layout.LayerCount];
        int offset = 0;
        for (int l = 0; l < layout.LayerCount; l++)
        {
            int rows = layout.Out(l), cols = layout.In(l);
            var slice = p.Slice(offset, rows * cols).ToArray();
            w[l] = M.Dense(rows, cols, (r, c) => slice[r * cols + c]);
            offset += rows * cols;
            b[l] = V.Dense(p.Slice(offset, rows).ToArray());
            offset += rows;
        }
        return (w, b);
    }

    private static double[] Pack(ParameterLayout layout, Matrix<double>[] w, Vector<double>[] b)
    {
        var flat = new double[layout.Length];
        int offset = 0;
        for (int l = 0; l < layout.LayerCount; l++)
        {
            for (int r = 0; r < w[l].RowCount; r++)
                for (int c = 0; c < w[l].ColumnCount; c++)
                    flat[offset++] = w[l][r, c];
            for (int r = 0; r < b[l].Count; r++) flat[offset++] = b[l][r];
        }
        return flat;
    }
}
