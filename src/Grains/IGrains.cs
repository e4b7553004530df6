using Backprop.Core.Training;
using Backprop.Grains.Messages;
using Orleans.Concurrency;

namespace Backprop.Grains;

/// <summary>A training run (key: run id). Owns the loop as background work; every call returns promptly.</summary>
public interface IRunGrain : IGrainWithStringKey
{
    /// <summary>Starts the run; fails if this run id was already started with a different spec.</summary>
    Task<RunStatus> Start(RunSpec spec);
    /// <summary>The run's state, with the finished epochs after the first <paramref name="knownEpochs"/>.</summary>
    Task<RunStatus> GetStatus(int knownEpochs = 0);
    /// <summary>Returns when the run has finished or <paramref name="maxWait"/> has passed (clamped under the response timeout).</summary>
    [AlwaysInterleave]
    Task<RunStatus> WaitForFinish(TimeSpan maxWait, int knownEpochs = 0);
    Task<RunStatus> Cancel();
    /// <summary>Continues a stopped run (interrupted, cancelled or failed) from its last checkpoint; a running run is left as it is.</summary>
    Task<RunStatus> Resume();
    /// <summary>The parameters after the last applied step.</summary>
    Task<TrainedModel> GetModel();
    /// <summary>
    /// Deletes a finished run's record and its shards' stored state. Only for a run the run list no longer holds: the
    /// list calls it for the finished runs its retention policy evicts; anything else is refused.
    /// </summary>
    Task Forget();
}

/// <summary>
/// Slice j of a run's parameters and optimizer state (key: "{runId}/{j}", j &lt; the spec's ServerShards): the only
/// writer of that slice. Workers push their blocks' gradient sums to it and get the next version's slice back; it
/// applies a step once every block of it has arrived, reducing them with the fixed pairwise tree.
/// </summary>
public interface IParameterShardGrain : IGrainWithStringKey
{
    /// <summary>
    /// A coordinator of incarnation <paramref name="incarnation"/> takes over the run (stored before it counts):
    /// pushes of older incarnations are refused from then on. Only the spec and incarnation that the run's stored
    /// record holds, while it is running, from the caller that holds the record's <see cref="RunRecord.CoordinatorKey"/>,
    /// are accepted. Returns the versions this shard can move to.
    /// </summary>
    Task<ShardPosition> Attach(RunSpec spec, int incarnation, long coordinatorKey);
    /// <summary>
    /// Moves the shard to version <paramref name="step"/> (one it holds in memory, a stored checkpoint, or 0: initial)
    /// for the coordinator's attach <paramref name="session"/>: pushes and pulls of other sessions are refused from then on.
    /// Only from the coordinator that attached (its incarnation and key).
    /// </summary>
    Task MoveTo(int incarnation, long coordinatorKey, long session, long step);
    /// <summary>
    /// Adds one block of step <see cref="GradientPush.Step"/>; the block that completes the step applies it. Returns
    /// once the step is applied (with the next version's slice) or after a short wait (without). A block of a step
    /// already applied returns the next version and changes nothing. A non-finite gradient or loss refuses the step as divergence.
    /// </summary>
    [AlwaysInterleave]
    Task<PushReply> Push(GradientPush push);
    /// <summary>
    /// Shard 0 of a run that clips its gradient: takes another shard's part of step <see cref="NormPart.Step"/>'s
    /// squared norm and answers the total over every shard once all parts are in (the same number for every shard),
    /// or null after a short wait (ask again). Only from a shard attached to the same coordinator and session.
    /// </summary>
    [AlwaysInterleave]
    Task<double?> GradientNorm(NormPart part);
    /// <summary>This shard's slice of version <paramref name="step"/>, the current one or the one before it.</summary>
    [AlwaysInterleave]
    Task<ParameterVersion> Pull(long session, long step);
    /// <summary>The slice of the last version: the current one when attached, else the latest stored checkpoint.</summary>
    Task<ParameterVersion> GetParameters();
    /// <summary>Stores the current version, which must be <paramref name="step"/>, as a checkpoint (the older of two slots). Only from the coordinator that attached.</summary>
    Task Checkpoint(int incarnation, long coordinatorKey, long step);
    /// <summary>
    /// When the stored run record says completed: deletes every stored slot but the one of the final version (the
    /// record's last epoch) and lets the activation's buffers go. Anything else is refused; nothing is taken from the caller.
    /// </summary>
    Task Retire();
    /// <summary>Deletes the shard's stored state (fence, checkpoints) while the run list is deleting its run; refused otherwise.</summary>
    Task Forget();
}

/// <summary>Computes chunk gradient sums and evaluations (key: "{runId}/{incarnation}.{generation}/{index}"). Stateless beyond caches.</summary>
public interface IWorkerGrain : IGrainWithStringKey
{
    // The coordinator bounds each call by the spec (WorkBounds, at most an hour) and redoes it elsewhere after that;
    // Orleans' own timeout (30 s by default) must not cut a legal, slow call before.
    /// <summary>The gradient sums of an aligned block of a window of steps, reduced in the tree's order and pushed to the run's shards.</summary>
    [ResponseTimeout("01:05:00")]
    Task<BlockDone> ComputeBlock(BlockWork work);
    [ResponseTimeout("01:05:00")]
    Task<Evaluation> Evaluate(EvalWork work);
}

/// <summary>
/// The cluster's list of runs (one grain, key "all"): what `runs` prints, and which runs the silos' watchdogs
/// keep going after a coordinator's silo dies.
/// </summary>
public interface IRunRegistryGrain : IGrainWithStringKey
{
    /// <summary>
    /// Lists or updates a run that has a stored record: a run said to be running (a start registers before its record
    /// says so), else in the state its record holds. A run with no record is refused and, if listed, dropped.
    /// </summary>
    Task Update(RunSummary summary);
    Task<RunSummary[]> List();
    Task<string[]> Running();
    /// <summary>Whether <paramref name="runId"/> was evicted by the retention policy and is being deleted (as stored).</summary>
    [AlwaysInterleave]
    Task<bool> IsBeingDeleted(string runId);
    /// <summary>Endpoints of the active silos that host workers: a cluster run's default worker count is their number.</summary>
    Task<string[]> WorkerSilos();
}
