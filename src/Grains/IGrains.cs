using Backprop.Core.Training;
using Backprop.Grains.Messages;
using Orleans.Concurrency;

namespace Backprop.Grains;

/// <summary>A training run (key: run id). Owns the loop as background work; every call returns promptly.</summary>
public interface IRunGrain : IGrainWithStringKey
{
    /// <summary>Starts the run; fails if this run id was already started with a different spec.</summary>
    Task<RunStatus> Start(RunSpec spec);
    Task<RunStatus> GetStatus();
    /// <summary>Returns when the run has finished or <paramref name="maxWait"/> has passed (keep it under the response timeout).</summary>
    [AlwaysInterleave]
    Task<RunStatus> WaitForFinish(TimeSpan maxWait);
    Task<RunStatus> Cancel();
    /// <summary>The parameters after the last applied step.</summary>
    Task<TrainedModel> GetModel();
}

/// <summary>The parameters, optimizer state and step counter of a run (key: run id). The only writer of parameters.</summary>
public interface IParameterServerGrain : IGrainWithStringKey
{
    Task<ParameterVersion> Initialize(RunSpec spec);
    Task<ParameterVersion> GetParameters();
    /// <summary>
    /// Applies one step: sums <paramref name="chunkSums"/> in the order given (chunk order), divides by
    /// <paramref name="samples"/>, steps the optimizer. <paramref name="expectedStep"/> guards against a
    /// step being applied twice.
    /// </summary>
    Task<ParameterVersion> ApplyStep(long expectedStep, FloatPayload[] chunkSums, int samples);
    /// <summary>Writes parameters, optimizer state and step to grain storage.</summary>
    Task Checkpoint();
}

/// <summary>Computes chunk gradient sums and evaluations (key: "{runId}/{index}"). Stateless beyond caches.</summary>
public interface IWorkerGrain : IGrainWithStringKey
{
    Task<ChunkResults> ComputeChunks(ChunkWork work);
    Task<Evaluation> Evaluate(EvalWork work);
}
