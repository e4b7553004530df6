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
    [property: Id(13)] int EpochsDone)
{
    public bool IsFinished => State is RunState.Completed or RunState.Failed or RunState.Cancelled or RunState.Diverged;
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
