using Backprop.Core.Numerics;

namespace Backprop.Core.Data;

/// <summary>
/// MNIST-shaped generated data for tests and benchmarks that must not depend on a download: each class
/// has a random prototype image, and a sample is its prototype with a random share of pixels replaced by
/// noise. Learnable, but not linearly trivial at high noise.
/// </summary>
public static class SyntheticDigits
{
    public static TrainTest Create(int trainCount, int testCount, long seed, double noise = 0.5, int side = 28, int classes = 10)
    {
        var rng = Rng.For(seed, "synthetic");
        int f = side * side;
        var prototypes = new byte[classes * f];
        for (int i = 0; i < prototypes.Length; i++) prototypes[i] = rng.NextDouble() < 0.3 ? (byte)rng.NextInt(256) : (byte)0;
        return new TrainTest(Make("synthetic", trainCount), Make("synthetic", testCount));

        Dataset Make(string name, int count)
        {
            var pixels = new byte[count * f];
            var labels = new byte[count];
            for (int s = 0; s < count; s++)
            {
                int c = rng.NextInt(classes);
                labels[s] = (byte)c;
                for (int k = 0; k < f; k++)
                    pixels[s * f + k] = rng.NextDouble() < noise ? (byte)rng.NextInt(256) : prototypes[c * f + k];
            }
            return new Dataset(name, side, side, pixels, labels, classes);
        }
    }
}
