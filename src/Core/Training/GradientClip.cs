using System.Numerics.Tensors;
using System.Runtime.Intrinsics;
using Backprop.Core.Numerics;

namespace Backprop.Core.Training;

/// <summary>
/// Clipping by global norm, as torch.nn.utils.clip_grad_norm_ (max_norm, the 2-norm, eps 1e-6): the step's mean
/// gradient g = sum / count is scaled by c = max_norm / (‖g‖ + 1e-6) when c &lt; 1. The gradient sum is multiplied by c
/// (in float) before the optimizer divides it by the count.
///
/// The norm is added up in an order that no cut of the vector changes, so it is the same bits for any number of
/// parameter-server shards: Σ g² of each tile of <see cref="Tile"/> entries at global offsets k·Tile (in double, 8
/// fixed lanes, whatever the machine's vector width), then the tiles' sums added left to right in tile order. A shard's
/// slice starts on a tile (<see cref="RunSpec.Shards"/> aligns the cuts when clipping is on), so each shard computes
/// its tiles' sums and the tiles of all shards, in shard order, are the tiles of the whole vector.
/// </summary>
public static class GradientClip
{
    /// <summary>Entries of one norm tile; a shard's slice starts on a multiple of it.</summary>
    public const int Tile = 1024;

    /// <summary>Tiles of a slice of <paramref name="length"/> entries that starts on a tile.</summary>
    public static int Tiles(int length) => (int)(((long)length + Tile - 1) / Tile);

    /// <summary>Σ g² of each tile of <paramref name="gradient"/> (which starts on a tile) into <paramref name="sums"/>; a non-finite entry gives a non-finite sum.</summary>
    public static void SquaredSums(ReadOnlySpan<float> gradient, Span<double> sums)
    {
        if (sums.Length != Tiles(gradient.Length))
            throw new ArgumentException($"{sums.Length} sums for the {Tiles(gradient.Length)} tiles of {gradient.Length} entries");
        for (int t = 0; t < sums.Length; t++)
        {
            int start = t * Tile;
            sums[t] = SquaredSum(gradient.Slice(start, Math.Min(Tile, gradient.Length - start)));
        }
    }

    /// <summary>The tiles' sums added left to right: the squared norm of the gradient sum.</summary>
    public static double Total(ReadOnlySpan<double> sums) => Add(0, sums);

    /// <summary>
    /// The tiles' sums of every shard's slice, in shard order, added left to right as one run of tiles: the same
    /// additions as <see cref="Total"/> over the whole vector's tiles (never a subtotal per shard, which rounds otherwise).
    /// </summary>
    public static double Total(IEnumerable<double[]> shardTileSums)
    {
        double total = 0;
        foreach (var sums in shardTileSums) total = Add(total, sums);
        return total;
    }

    private static double Add(double total, ReadOnlySpan<double> sums)
    {
        foreach (double s in sums) total += s;
        return total;
    }

    /// <summary>
    /// The factor for a gradient sum over <paramref name="count"/> samples whose squared norm is
    /// <paramref name="sumOfSquares"/>: max_norm / (‖sum / count‖ + 1e-6) when below 1, else exactly 1 (no change).
    /// </summary>
    public static float Scale(double sumOfSquares, int count, double maxNorm)
    {
        if (count < 1) throw new ArgumentOutOfRangeException(nameof(count), $"{count} samples");
        double coefficient = maxNorm / (Math.Sqrt(sumOfSquares) / count + 1e-6);
        return coefficient < 1 ? (float)coefficient : 1f;
    }

    /// <summary>
    /// The optimizer's step <paramref name="step"/> over a whole slice with its gradient sum scaled by <paramref name="scale"/>,
    /// a tile at a time through <paramref name="scratch"/> (at least <see cref="Tile"/> floats). State arrays hold the
    /// optimizer's vectors one after another, each <paramref name="parameters"/>.Length long; outputs may be the inputs.
    /// </summary>
    public static void Step(Optimizer optimizer, long step, float scale, int count, float[] parameters, ReadOnlySpan<float> gradientSum,
        float[] state, float[] parametersOut, float[] stateOut, Span<float> scratch)
    {
        int length = parameters.Length;
        if (gradientSum.Length != length) throw new ArgumentException($"a gradient of {gradientSum.Length} entries for {length} parameters");
        for (int start = 0; start < length; start += Tile)
        {
            int n = Math.Min(Tile, length - start);
            var gradient = gradientSum.Slice(start, n);
            if (scale != 1f)
            {
                TensorPrimitives.Multiply(gradient, scale, scratch[..n]);
                gradient = scratch[..n];
            }
            optimizer.Step(step, parameters.AsSpan(start, n), gradient, count, new StateTile(state, length, start, n),
                parametersOut.AsSpan(start, n), new StateTile(stateOut, length, start, n));
        }
    }

    private static double SquaredSum(ReadOnlySpan<float> values)
    {
        // Lanes 0–3 and 4–7 of each 8 entries; then the lanes in order, then the tail: the same order on every machine.
        Vector256<double> low = Vector256<double>.Zero, high = Vector256<double>.Zero;
        int i = 0;
        for (; i + 8 <= values.Length; i += 8)
        {
            var (l, h) = Vector256.Widen(Vector256.Create(values.Slice(i, 8)));
            low += l * l;
            high += h * h;
        }
        double sum = 0;
        for (int lane = 0; lane < 4; lane++) sum += low[lane];
        for (int lane = 0; lane < 4; lane++) sum += high[lane];
        for (; i < values.Length; i++) sum += (double)values[i] * values[i];
        return sum;
    }
}
