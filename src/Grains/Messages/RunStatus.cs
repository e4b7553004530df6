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
    [property: Id(8)] int[] Confusion);

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
    [property: Id(10)] string? ParameterServerSilo,
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
