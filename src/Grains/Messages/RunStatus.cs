using Backprop.Core.Training;

namespace Backprop.Grains.Messages;

public enum RunState { NotStarted, Running, Completed, Failed, Cancelled, Diverged }

[GenerateSerializer, Immutable]
public sealed record EpochResult(
    [property: Id(0)] int Epoch,
    [property: Id(1)] double TrainLoss,
    [property: Id(2)] double TestLoss,
    [property: Id(3)] double TestAccuracy,
    [property: Id(4)] double Seconds,
    [property: Id(5)] double SamplesPerSecond,
    [property: Id(6)] string ParameterSha256,
    [property: Id(7)] long Steps,
    [property: Id(8)] int[] Confusion,
    [property: Id(9)] StepProfile? Profile = null,
    // On the held-out validation images (--validation); null without them.
    [property: Id(30)] double? ValidationLoss = null,
    [property: Id(31)] double? ValidationAccuracy = null);

/// <summary>
/// Where an epoch's training steps spent their time (evaluation excluded), as means per step, measured by the
/// coordinator: the workers report their compute and push times, the shards' reduce-and-step time, the bytes they
/// exchanged with shards in other processes, and their process' allocation counter (<see cref="GC.GetTotalAllocatedBytes(bool)"/>), so that the sum covers coordinator,
/// server and workers once per process.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record StepProfile(
    // Training steps of the epoch that this profile covers.
    [property: Id(0)] int Steps,
    // Training time of the epoch (the steps only, evaluation excluded).
    [property: Id(1)] double TrainSeconds,
    // The times below are per step. Backprop and pre-reduction of the slowest worker.
    [property: Id(2)] double SlowestComputeSeconds,
    [property: Id(3)] double FastestComputeSeconds,
    // The slowest worker's calls minus its compute and pushes (the coordinator's message, serialization and
    // scheduling), plus its pulls of the parameters where it had to.
    [property: Id(4)] double TransferSeconds,
    // Reduction of the blocks' sums and the optimizer step inside a shard (the slowest shard).
    [property: Id(5)] double ReduceAndStepSeconds,
    // The slowest worker's pushes to the shards, from sending its sum to the next version back, minus the reduce-and-step.
    [property: Id(6)] double ServerCallSeconds,
    // From the first worker's reply to the last one's at the end of each call, spread over its steps (the waits for
    // siblings within a call are in the pushes).
    [property: Id(7)] double BarrierWaitSeconds,
    // Payload bytes (parameters and gradients) that crossed between processes, per step.
    [property: Id(8)] double WireBytesPerStep,
    // Bytes allocated per step by every process the step ran in, together.
    [property: Id(9)] double AllocatedBytesPerStep,
    // Calls the coordinator made to each worker for these steps: each call runs a window of steps, the shards being
    // the barrier between them.
    [property: Id(10)] int WorkerCalls);

/// <summary>Something that happened to a run: failures, what was redone, resumes.</summary>
[GenerateSerializer, Immutable]
public sealed record RunEvent([property: Id(0)] DateTime Time, [property: Id(1)] string Kind, [property: Id(2)] string Message);

/// <summary>
/// A snapshot of a run for the CLI: where it is, and the finished epochs the caller has not seen yet
/// (<see cref="Epochs"/> holds epochs after the count it said it knew; <see cref="EpochsDone"/> is the total).
/// </summary>
[GenerateSerializer, Immutable]
public sealed record RunStatus(
    [property: Id(0)] string RunId,
    [property: Id(1)] RunState State,
    [property: Id(2)] RunSpec? Spec,
    [property: Id(3)] int Epoch,
    [property: Id(4)] int StepInEpoch,
    [property: Id(5)] int StepsPerEpoch,
    [property: Id(6)] EpochResult[] Epochs,
    [property: Id(7)] string? Error,
    [property: Id(8)] string[] WorkerSilos,
    [property: Id(9)] string CoordinatorSilo,
    [property: Id(10)] string[] ShardSilos,
    [property: Id(11)] long Step,
    [property: Id(12)] RunEvent[] Events,
    [property: Id(13)] int EpochsDone,
    [property: Id(14)] WorkerStats[] Workers)
{
    public bool IsFinished => State is RunState.Completed or RunState.Failed or RunState.Cancelled or RunState.Diverged;
}

/// <summary>
/// One worker of the run's current generation as the coordinator measured it, from the windows of steps it answered:
/// its silo, the blocks it computed (one a step), and the median and 95th percentile of its compute seconds per step
/// over the last <see cref="Steps"/> steps, each step's time scaled to an average block (where the cut gives
/// workers unequal blocks, 3 workers on 4 chunks: 1, 1, 2, the one with more chunks is not slow for that). A worker
/// is a straggler when its median is over <see cref="StragglerFactor"/> times the other workers' (<see cref="Others"/>; see <see cref="WorkerTimes"/>).
/// </summary>
[GenerateSerializer, Immutable]
public sealed record WorkerStats(
    [property: Id(0)] int Worker,
    [property: Id(1)] string Silo,
    [property: Id(2)] int Blocks,
    [property: Id(3)] double ComputeMedianSeconds,
    [property: Id(4)] double ComputeP95Seconds,
    [property: Id(5)] bool Straggler)
{
    /// <summary>The steps behind each worker's figures: the last ones of its generation.</summary>
    public const int Steps = 200;
    public const double StragglerFactor = 1.5;

    /// <summary>What a worker is compared with: the median of the workers' medians, and of their 95th percentiles.</summary>
    public static (double Median, double P95) Typical(IReadOnlyCollection<WorkerStats> workers) =>
        (Median(workers.Select(w => w.ComputeMedianSeconds)), Median(workers.Select(w => w.ComputeP95Seconds)));

    /// <summary>
    /// The other workers' typical figures: a worker is compared with the rest, so that with an even count (2 workers,
    /// or 4 on 2 silos) a slow one does not pull the median it is judged by towards itself.
    /// </summary>
    public (double Median, double P95) Others(IReadOnlyCollection<WorkerStats> workers) => Typical(workers.Where(w => w.Worker != Worker).ToArray());

    /// <summary>This worker's median compute over the other workers' median (0 when there is nothing to compare with).</summary>
    public double Slowdown(IReadOnlyCollection<WorkerStats> workers) => Others(workers).Median is > 0 and var median ? ComputeMedianSeconds / median : 0;

    /// <summary>How much slower than the other workers this one is: "worker 3 on 10.0.0.7:11111 is 2.1x slower than the median (p95 41 ms vs 19 ms)".</summary>
    public string Slower(IReadOnlyCollection<WorkerStats> workers)
    {
        var (_, p95) = Others(workers);
        return $"worker {Worker} on {Silo} is {Slowdown(workers):0.0}x slower than the median (p95 {Milliseconds(ComputeP95Seconds)} ms vs {Milliseconds(p95)} ms)";
    }

    public static string Milliseconds(double seconds) => (seconds * 1000).ToString(seconds < 0.01 ? "0.##" : "0");

    private static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        if (sorted.Length == 0) return 0;
        int middle = sorted.Length / 2;
        return sorted.Length % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
    }
}

[GenerateSerializer, Immutable]
public sealed record TrainedModel([property: Id(0)] RunSpec Spec, [property: Id(1)] FloatPayload Parameters, [property: Id(2)] long Step);

/// <summary>One line of the run list: what `runs` prints.</summary>
[GenerateSerializer, Immutable]
public sealed record RunSummary(
    [property: Id(0)] string RunId,
    [property: Id(1)] RunState State,
    [property: Id(2)] int EpochsDone,
    [property: Id(3)] int Epochs,
    [property: Id(4)] double? LastAccuracy,
    [property: Id(5)] DateTime Updated);
