using Backprop.Core.Training;

namespace Backprop.Grains.Messages;

/// <summary>Parameters of one version (the number of optimizer steps applied so far): the whole vector, or one shard's slice of it.</summary>
[GenerateSerializer, Immutable]
public sealed record ParameterVersion([property: Id(0)] long Step, [property: Id(1)] FloatPayload Parameters);

/// <summary>
/// Compute block <see cref="Block"/> of <see cref="Steps"/> consecutive steps from step <see cref="Step"/> (within one
/// epoch, every one of them with the cut <see cref="BlockStarts"/>), the chunks from <see cref="FirstChunk"/> to the next block's start
/// in each: an aligned block of the reduction tree (<see cref="ChunkBlocks"/>), the first on the parameters of version
/// <see cref="Version"/>, and push each step's gradient sum to the run's parameter-server shards, which apply the step
/// once every block has arrived and answer with the next version: the shards are the step barrier, so a worker goes
/// from step to step without the coordinator. The worker rebuilds the epoch plan from the spec, so only chunk numbers
/// travel, never sample indices or data, and it gets the parameters from the shards (the version its last push
/// brought back, or pulled), so the coordinator never carries a vector.
/// <see cref="Session"/> is the coordinator's attach to the shards (a version number means the same bits only within
/// one). <see cref="EpochLossBefore"/> is the epoch's training loss sum before the first step, which the shards keep
/// with their checkpoints (they answer each step with the sum after it). <see cref="DatasetSha256"/> is the run's data
/// set: a worker whose copy differs refuses the work.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record BlockWork(
    [property: Id(0)] RunSpec Spec,
    [property: Id(1)] int Incarnation,
    [property: Id(2)] int Epoch,
    [property: Id(3)] int Step,
    [property: Id(4)] long Version,
    [property: Id(5)] int Block,
    [property: Id(6)] int[] BlockStarts,
    [property: Id(7)] double EpochLossBefore,
    [property: Id(8)] string DatasetSha256,
    [property: Id(9)] long Session,
    [property: Id(10)] int Steps = 1)
{
    public int FirstChunk => BlockStarts[Block];
}

/// <summary>
/// A block's steps delivered to every shard. <see cref="StepLosses"/>: the training loss sum of each step that every
/// shard confirmed as applied, in order, as the shards added it up (its blocks' losses in block order); a worker stops
/// at the first step not confirmed (its siblings did not arrive within the shards' wait) or refused
/// (<see cref="Divergence"/>: a non-finite gradient or loss). For the step profile, sums over the steps computed: the
/// worker's compute time, the time it spent getting parameters and pushing, the slowest shard's reduce-and-step time;
/// whether it had to pull parameters, its process' allocation counter (<see cref="GC.GetTotalAllocatedBytes(bool)"/>) at the end and
/// at the start of the call,
/// and the payload bytes it exchanged with shards in other processes.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record BlockDone(
    [property: Id(0)] int FirstChunk,
    [property: Id(1)] double[] StepLosses,
    [property: Id(2)] string Silo,
    [property: Id(3)] double ComputeSeconds,
    [property: Id(4)] double PullSeconds,
    [property: Id(5)] double PushSeconds,
    [property: Id(6)] double ReduceAndStepSeconds,
    [property: Id(7)] bool Pulled,
    [property: Id(8)] long AllocatedBytes,
    [property: Id(9)] long WireBytes,
    [property: Id(10)] string? Divergence,
    [property: Id(11)] long AllocatedBytesAtStart)
{
    /// <summary>Steps applied by every shard, from the first of the work on.</summary>
    public int Applied => StepLosses.Length;
}

/// <summary>
/// Evaluate test samples [Start, End) under the parameters of version <see cref="Version"/> (from the shards); with
/// <see cref="Validation"/>, the held-out validation samples [Start, End) instead (counted from the first of them).
/// </summary>
[GenerateSerializer, Immutable]
public sealed record EvalWork(
    [property: Id(0)] RunSpec Spec,
    [property: Id(1)] int Incarnation,
    [property: Id(2)] long Version,
    [property: Id(3)] int Start,
    [property: Id(4)] int End,
    [property: Id(5)] string DatasetSha256,
    [property: Id(6)] long Session,
    [property: Id(7)] bool Validation = false);

/// <summary>
/// One block's gradient sum, the shard's slice of it, for step <see cref="Step"/> (the version it was computed on),
/// from a worker of coordinator incarnation <see cref="Incarnation"/>. Every block of a step carries the same cut
/// (<see cref="BlockStarts"/>), sample count and <see cref="EpochLossBefore"/>.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record GradientPush(
    [property: Id(0)] int Incarnation,
    [property: Id(1)] long Step,
    [property: Id(2)] int Block,
    [property: Id(3)] int[] BlockStarts,
    [property: Id(4)] int Samples,
    [property: Id(5)] double EpochLossBefore,
    [property: Id(6)] double BlockLoss,
    [property: Id(7)] FloatPayload Gradient,
    [property: Id(8)] long Session);

/// <summary>
/// Shard <see cref="Shard"/>'s part of the squared norm of step <see cref="Step"/>'s gradient, for a run that clips it:
/// Σ g² of each norm tile of its slice, in tile order (<see cref="Backprop.Core.Training.GradientClip"/>). Sent to
/// shard 0, which adds up every shard's tiles in shard order.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record NormPart(
    [property: Id(0)] int Incarnation,
    [property: Id(1)] long Session,
    [property: Id(2)] long Step,
    [property: Id(3)] int Shard,
    [property: Id(4)] double[] TileSums);

/// <summary>
/// A shard's answer to a push: its slice of the next version once the step is applied (null when the other blocks
/// did not arrive within the wait: the worker pulls it when it needs it) with the step's loss sum and the epoch's
/// after it, or why the step was refused as diverged; with the time the reduce-and-step took and the shard's
/// process' allocation counter, for the step profile; and where the shard's silo takes pushes and pulls beside
/// Orleans (<see cref="Lane"/>: its data lane's "address:port", null when it has none).
/// </summary>
[GenerateSerializer, Immutable]
public sealed record PushReply(
    [property: Id(0)] ParameterVersion? Next,
    [property: Id(1)] string? Divergence,
    [property: Id(2)] double ReduceAndStepSeconds,
    [property: Id(3)] long AllocatedBytes,
    [property: Id(4)] string Silo,
    [property: Id(5)] double StepLoss,
    [property: Id(6)] double EpochLossSum,
    [property: Id(7)] string? Lane = null);

/// <summary>
/// Where a shard stands when a coordinator attaches: the versions it can move to (in memory, or stored
/// checkpoints) with the epoch's loss sum at each, and its silo.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record ShardPosition(
    [property: Id(0)] long[] Steps,
    [property: Id(1)] double[] EpochLossSums,
    [property: Id(2)] long CheckpointStep,
    [property: Id(3)] string Silo);

/// <summary>A push to shard <see cref="Shard"/> (its grain key) through a data lane; the gradient travels after it, as raw bytes.</summary>
[GenerateSerializer, Immutable]
public sealed record LanePush([property: Id(0)] string Shard, [property: Id(1)] GradientPush Push);

/// <summary>A pull of shard <see cref="Shard"/>'s slice of version <see cref="Step"/> through a data lane.</summary>
[GenerateSerializer, Immutable]
public sealed record LanePull([property: Id(0)] string Shard, [property: Id(1)] long Session, [property: Id(2)] long Step);
