namespace Backprop.Core.Training;

/// <summary>
/// How long a piece of a run's work may take on the slowest worker this project assumes, from the spec alone: the
/// coordinator waits that long for a call before it redoes the work elsewhere (a silo that dies fails its calls at
/// once; this bound is for one that hangs), and a spec whose step could take longer than <see cref="Longest"/> is
/// refused. The worker calls' response timeout is above <see cref="Longest"/>, so a legal step that is merely slow
/// is never redone while it still computes.
/// </summary>
public static class WorkBounds
{
    /// <summary>
    /// The slowest backprop rate assumed for one worker thread: 0.2 GFLOP/s, below the per-sample reference
    /// implementation (about 0.28 on the development machine) and hundreds of times below the batched kernel.
    /// </summary>
    public const double FloorFlopsPerSecond = 2e8;
    /// <summary>The slowest link assumed for a vector between processes: 10 MB/s.</summary>
    public const double FloorBytesPerSecond = 1e7;
    /// <summary>The longest a step (or an evaluation call) may be bounded at: the worker calls' response timeout is above it.</summary>
    public static readonly TimeSpan Longest = TimeSpan.FromHours(1);
    /// <summary>A shard's wait for the other blocks of a step (ParameterShardGrain.PushWait), and scheduling.</summary>
    private const double FixedSeconds = 3;

    /// <summary>One step of a block of <paramref name="chunks"/> chunks: backprop (about 6 FLOPs per parameter and sample), a pull and a push of the vector.</summary>
    public static TimeSpan Step(RunSpec spec, int chunks) => Seconds(
        FixedSeconds + 6.0 * spec.Model.ParameterCount * spec.ChunkSize * chunks / FloorFlopsPerSecond
        + 3.0 * sizeof(float) * spec.Model.ParameterCount / FloorBytesPerSecond);

    /// <summary><paramref name="steps"/> steps of such a block, one call; at most <see cref="Longest"/> (the call's timeout is above it).</summary>
    public static TimeSpan Window(RunSpec spec, int chunks, int steps) => Seconds(Math.Min(Step(spec, chunks).TotalSeconds * steps, Longest.TotalSeconds));

    /// <summary>An evaluation of <paramref name="samples"/> test samples (forward only: about 2 FLOPs per parameter and sample) after a pull.</summary>
    public static TimeSpan Evaluation(RunSpec spec, int samples) => Seconds(
        FixedSeconds + 2.0 * spec.Model.ParameterCount * samples / FloorFlopsPerSecond + sizeof(float) * spec.Model.ParameterCount / FloorBytesPerSecond);

    /// <summary>Refuses a spec whose full step on one worker could take longer than <see cref="Longest"/>.</summary>
    public static void Check(RunSpec spec)
    {
        var step = Step(spec, spec.ChunksPerStep);
        if (step > Longest)
            throw new ArgumentException($"a step of {spec.ChunksPerStep} chunks of {spec.ChunkSize} samples through {spec.Model.ParameterCount} parameters "
                + $"could take {step.TotalHours:F1} h on one slow worker (at {FloorFlopsPerSecond / 1e9:F1} GFLOP/s), over the {Longest.TotalHours:F0} h a call may take: use smaller chunks or batches");
    }

    private static TimeSpan Seconds(double seconds) => TimeSpan.FromSeconds(Math.Min(seconds, TimeSpan.MaxValue.TotalSeconds / 2));
}
