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
}

/// <summary>The parameters, optimizer state and step counter of a run (key: run id). The only writer of parameters.</summary>
public interface IParameterServerGrain : IGrainWithStringKey
{
    /// <summary>
    /// A coordinator of incarnation <paramref name="incarnation"/> takes over the run: later steps from older
    /// incarnations are refused. Loads the last checkpoint, or initializes the parameters from the spec.
    /// </summary>
    Task<ServerPosition> Attach(RunSpec spec, int incarnation);
    Task<ParameterVersion> GetParameters();
    /// <summary>
    /// Applies step <see cref="StepUpdate.Step"/> once: reduces the blocks' sums with the pairwise tree,
    /// divides by the sample count, steps the optimizer. A step that was already applied returns the current
    /// version and changes nothing. A non-finite gradient is refused as divergence.
    /// </summary>
    Task<StepOutcome> ApplyStep(StepUpdate update);
    /// <summary>Writes parameters, optimizer state, step and the epoch's loss sum to grain storage.</summary>
    Task Checkpoint(int incarnation);
}

/// <summary>Computes chunk gradient sums and evaluations (key: "{runId}/{incarnation}.{generation}/{index}"). Stateless beyond caches.</summary>
public interface IWorkerGrain : IGrainWithStringKey
{
    /// <summary>The gradient sum of an aligned block of a step's chunks, reduced in the tree's order.</summary>
    Task<BlockSum> ComputeBlock(BlockWork work);
    /// <summary>This worker's block (the first) and, through the workers named, the others of its silo; the sums in the same order.</summary>
    Task<BlockSum[]> ComputeBlocks(BlockGroupWork work);
    Task<Evaluation> Evaluate(EvalWork work);
}

/// <summary>
/// The cluster's list of runs (one grain, key "all"): what `runs` prints, and which runs the silos' watchdogs
/// keep going after a coordinator's silo dies.
/// </summary>
public interface IRunRegistryGrain : IGrainWithStringKey
{
    Task Update(RunSummary summary);
    Task<RunSummary[]> List();
    Task<string[]> Running();
    /// <summary>Endpoints of the active silos that host workers: a cluster run's default worker count is their number.</summary>
    Task<string[]> WorkerSilos();
}
