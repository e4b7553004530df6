using Backprop.Core.Training;

namespace Backprop.Grains.Messages;

/// <summary>Parameters of one version (the number of optimizer steps applied so far).</summary>
[GenerateSerializer, Immutable]
public sealed record ParameterVersion([property: Id(0)] long Step, [property: Id(1)] FloatPayload Parameters);

/// <summary>
/// Compute the gradient sum of chunks [<see cref="FirstChunk"/>, <see cref="EndChunk"/>) of one step: an aligned
/// block of the reduction tree (<see cref="Backprop.Core.Training.ChunkBlocks"/>), reduced by the worker. The
/// worker rebuilds the epoch plan from the spec, so only chunk numbers travel, never sample indices or data.
/// <see cref="DatasetSha256"/> is the run's data set: a worker whose copy differs refuses the work.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record BlockWork(
    [property: Id(0)] RunSpec Spec,
    [property: Id(1)] int Epoch,
    [property: Id(2)] int Step,
    [property: Id(3)] int FirstChunk,
    [property: Id(4)] int EndChunk,
    [property: Id(5)] ParameterVersion Parameters,
    [property: Id(6)] string DatasetSha256);

/// <summary>
/// Several blocks of one step for workers that share a silo, sent to the first of them: the parameters cross
/// the network once for the silo (the message holds them once, however many blocks refer to them) and the
/// first worker hands the other blocks to <see cref="Workers"/> inside its silo, by reference.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record BlockGroupWork(
    [property: Id(0)] BlockWork[] Blocks,
    [property: Id(1)] IWorkerGrain[] Workers);

/// <summary>
/// One block's gradient sum and cost sum, with what the coordinator's step profile needs: the worker's compute
/// time and its process' allocation counter (<see cref="GC.GetTotalAllocatedBytes(bool)"/>) when it finished.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record BlockSum(
    [property: Id(0)] int FirstChunk,
    [property: Id(1)] FloatPayload GradientSum,
    [property: Id(2)] double LossSum,
    [property: Id(3)] string Silo,
    [property: Id(4)] double ComputeSeconds,
    [property: Id(5)] long AllocatedBytes);

/// <summary>Evaluate test samples [Start, End) under the given parameters.</summary>
[GenerateSerializer, Immutable]
public sealed record EvalWork(
    [property: Id(0)] RunSpec Spec,
    [property: Id(1)] int Start,
    [property: Id(2)] int End,
    [property: Id(3)] FloatPayload Parameters,
    [property: Id(4)] string DatasetSha256);

/// <summary>
/// One optimizer step, sent by the coordinator of incarnation <see cref="Incarnation"/>: the gradient sums of
/// step <see cref="Step"/>'s aligned blocks in block order, the step's sample count, and the epoch's training loss
/// sum up to and including this step (kept with checkpoints so that a resumed epoch reports the same loss).
/// </summary>
[GenerateSerializer, Immutable]
public sealed record StepUpdate(
    [property: Id(0)] int Incarnation,
    [property: Id(1)] long Step,
    [property: Id(2)] FloatPayload[] BlockSums,
    [property: Id(3)] int Samples,
    [property: Id(4)] double EpochLossSum);

/// <summary>
/// The server's answer to a step: the new version, or why the step was refused as diverged; with the time its
/// reduction and optimizer took and its process' allocation counter, for the step profile.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record StepOutcome(
    [property: Id(0)] ParameterVersion Version,
    [property: Id(1)] string? Divergence,
    [property: Id(2)] double ReduceAndStepSeconds = 0,
    [property: Id(3)] long AllocatedBytes = 0);

/// <summary>Where a run's parameters stand when a coordinator attaches to its server.</summary>
[GenerateSerializer, Immutable]
public sealed record ServerPosition(
    [property: Id(0)] ParameterVersion Version,
    [property: Id(1)] double EpochLossSum,
    [property: Id(2)] long CheckpointStep,
    [property: Id(3)] string Silo);
