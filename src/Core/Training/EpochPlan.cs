using Backprop.Core.Numerics;

namespace Backprop.Core.Training;

/// <summary>
/// The order samples are visited in one epoch, and how that order is cut into steps and chunks.
/// The permutation is a function of (seed, epoch) only; step s covers positions [s·B, s·B + B) (the
/// last step may be short) and chunk c of a step covers the next C positions within it. Any silo can
/// rebuild the plan from those numbers, so sample indices never travel in messages.
/// </summary>
public sealed class EpochPlan
{
    private readonly int[] _order;

    public EpochPlan(int sampleCount, int batchSize, int chunkSize, long seed, int epoch)
    {
        if (sampleCount < 0) throw new ArgumentOutOfRangeException(nameof(sampleCount), $"sample count {sampleCount} is negative");
        if (batchSize < 1 || batchSize > ResourceLimits.MaxBatchSize)
            throw new ArgumentOutOfRangeException(nameof(batchSize), $"batch-size: {batchSize} is outside 1..{ResourceLimits.MaxBatchSize}");
        if (chunkSize < 1 || chunkSize > batchSize)
            throw new ArgumentOutOfRangeException(nameof(chunkSize), $"chunk-size: {chunkSize} is outside 1..batch-size ({batchSize})");
        SampleCount = sampleCount;
        BatchSize = batchSize;
        ChunkSize = chunkSize;
        Seed = seed;
        _order = new int[sampleCount];
        MoveTo(epoch);
    }

    public int SampleCount { get; }
    public int BatchSize { get; }
    public int ChunkSize { get; }
    public long Seed { get; }
    public int Epoch { get; private set; }

    /// <summary>Re-plans for another epoch in place (no allocation).</summary>
    public void MoveTo(int epoch)
    {
        Epoch = epoch;
        Shuffle(_order, Seed, epoch);
    }
    public int Steps => (int)((SampleCount + (long)BatchSize - 1) / BatchSize);

    public int StepSize(int step) => Math.Min(BatchSize, SampleCount - step * BatchSize);
    public int ChunkCount(int step) => (StepSize(step) + ChunkSize - 1) / ChunkSize;

    /// <summary>The sample indices of chunk <paramref name="chunk"/> of step <paramref name="step"/>.</summary>
    public ReadOnlySpan<int> Chunk(int step, int chunk)
    {
        // Both numbers come from messages: range-checked before any product is formed (then none can wrap).
        if (step < 0 || step >= Steps || chunk < 0 || chunk >= ChunkCount(step))
            throw new ArgumentOutOfRangeException(nameof(chunk), $"step {step} chunk {chunk} is not in epoch {Epoch}'s plan");
        int start = chunk * ChunkSize;
        return _order.AsSpan(step * BatchSize + start, Math.Min(ChunkSize, StepSize(step) - start));
    }

    /// <summary>Fisher–Yates shuffle of 0..n-1 driven by the run seed and the epoch number.</summary>
    public static int[] Permutation(int n, long seed, int epoch)
    {
        var order = new int[n];
        Shuffle(order, seed, epoch);
        return order;
    }

    private static void Shuffle(int[] order, long seed, int epoch)
    {
        int n = order.Length;
        for (int i = 0; i < n; i++) order[i] = i;
        var rng = Rng.For(seed, "epoch", epoch);
        for (int i = n - 1; i > 0; i--)
        {
            int j = rng.NextInt(i + 1);
            (order[i], order[j]) = (order[j], order[i]);
        }
    }
}
