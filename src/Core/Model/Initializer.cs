using Backprop.Core.Numerics;

namespace Backprop.Core.Model;

public static class Initializer
{
    /// <summary>A fresh flat parameter vector for the spec, drawn deterministically from the seed.</summary>
    public static float[] Create(ModelSpec spec, InitScheme scheme, long seed)
    {
        var layout = new ParameterLayout(spec);
        var p = new float[layout.Length];
        var rng = Rng.For(seed, "init");
        for (int l = 0; l < layout.LayerCount; l++)
        {
            int fanIn = layout.In(l), fanOut = layout.Out(l);
            Span<float> w = layout.W(p.AsSpan(), l), b = layout.B(p.AsSpan(), l);
            switch (scheme)
            {
                case InitScheme.Normal:
                    Fill(w, () => rng.NextGaussian());
                    Fill(b, () => rng.NextGaussian());
                    break;
                case InitScheme.PyTorch:
                    double bound = 1.0 / Math.Sqrt(fanIn);
                    Fill(w, () => (2 * rng.NextDouble() - 1) * bound);
                    Fill(b, () => (2 * rng.NextDouble() - 1) * bound);
                    break;
                case InitScheme.He:
                    double std = Math.Sqrt(2.0 / fanIn);
                    Fill(w, () => rng.NextGaussian() * std);
                    break;
                case InitScheme.Xavier:
                    double limit = Math.Sqrt(6.0 / (fanIn + fanOut));
                    Fill(w, () => (2 * rng.NextDouble() - 1) * limit);
                    break;
                default:
                    throw new ArgumentOutOfRangeException(nameof(scheme), scheme, null);
            }
        }
        return p;
    }

    private static void Fill(Span<float> target, Func<double> sample)
    {
        for (int i = 0; i < target.Length; i++) target[i] = (float)sample();
    }
}
