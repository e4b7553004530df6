namespace Backprop.Core.Numerics;

/// <summary>
/// A small deterministic generator (SplitMix64). Ours rather than System.Random so that initial weights and
/// permutations are the same on every runtime version and machine: trained parameters are a pure function
/// of the run spec.
/// </summary>
public sealed class Rng
{
    private ulong _state;

    public Rng(ulong seed) => _state = seed;

    /// <summary>A generator for one purpose (init, the permutation of epoch e, ...) derived from the run seed.</summary>
    public static Rng For(long seed, string purpose, long index = 0)
    {
        ulong h = 14695981039346656037UL;
        foreach (char c in purpose) h = (h ^ c) * 1099511628211UL;
        return new Rng(Mix((ulong)seed ^ Mix(h ^ Mix((ulong)index))));
    }

    /// <summary>A number drawn for item <paramref name="index"/> under <paramref name="key"/>, without a generator's state (any item, in any order).</summary>
    public static ulong Hash(ulong key, long index) => Mix(key ^ Mix((ulong)index));

    private static ulong Mix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    public ulong NextUInt64()
    {
        _state += 0x9E3779B97F4A7C15UL;
        return Mix(_state);
    }

    /// <summary>Uniform in [0, 1) with 53 random bits.</summary>
    public double NextDouble() => (NextUInt64() >> 11) * (1.0 / (1UL << 53));

    /// <summary>Uniform integer in [0, n) without modulo bias (Lemire's method).</summary>
    public int NextInt(int n)
    {
        ulong bound = (ulong)n;
        ulong threshold = (0UL - bound) % bound;
        while (true)
        {
            ulong r = NextUInt64();
            ulong hi = Math.BigMul(r, bound, out ulong lo);
            if (lo >= threshold) return (int)hi;
        }
    }

    /// <summary>Standard normal sample (Box–Muller; one value per call keeps the stream simple).</summary>
    public double NextGaussian()
    {
        double u1 = 1.0 - NextDouble();
        double u2 = NextDouble();
        return Math.Sqrt(-2.0 * Math.Log(u1)) * Math.Cos(2.0 * Math.PI * u2);
    }
}
