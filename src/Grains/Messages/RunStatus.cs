using Backprop.Core.Training;

namespace Backprop.Grains.Messages;

public enum RunState { NotStarted, Running, Completed, Failed, Cancelled }

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

/// <summary>A snapshot of a run for the CLI: where it is, and every finished epoch.</summary>
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
    [property: Id(9)] string CoordinatorSilo)
{
    public bool IsFinished => State is RunState.Completed or RunState.Failed or RunState.Cancelled;
}

[GenerateSerializer, Immutable]
public sealed record TrainedModel([property: Id(0)] RunSpec Spec, [property: Id(1)] FloatPayload Parameters, [property: Id(2)] long Step);
