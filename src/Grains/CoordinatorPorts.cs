using Backprop.Core.Training;
using Backprop.Grains.Messages;

namespace Backprop.Grains;

// What a run's coordinator needs from the cluster, as the classes that do its work (RunJournal, RunWorkers,
// RunTraining, ParameterShards) see it: no grains and no grain storage, so that each can run against plain
// objects. RunGrain alone connects them to Orleans (CoordinatorGrainPorts.cs).

/// <summary>A record in storage whose only writer is this coordinator; <see cref="State"/> is the copy in memory.</summary>
internal interface IStoredState<T>
{
    T State { get; set; }

    /// <summary>Stores <see cref="State"/>.</summary>
    Task Write();

    /// <summary>
    /// Stores <see cref="State"/> as the authoritative copy, over another version found in storage, unless
    /// <paramref name="superseded"/>(stored, mine) says the stored one belongs to a newer owner: then
    /// <see cref="StaleCoordinatorException"/>. Transient failures are retried for a while.
    /// </summary>
    Task WriteAuthoritative(Func<T, T, bool>? superseded = null);
}

/// <summary>The cluster's list of runs, which the silos' watchdogs read to keep running runs going.</summary>
internal interface IRunList
{
    Task Update(RunSummary summary);
}

/// <summary>One worker of a run: computes blocks of steps and evaluations. Equal when they are the same worker.</summary>
internal interface IWorker
{
    Task<BlockDone> ComputeBlock(BlockWork work);
    Task<Evaluation> Evaluate(EvalWork work);
}

/// <summary>Workers by key ("{runId}/{incarnation}.{generation}/{index}"): placed on a worker silo when first called.</summary>
internal interface IWorkerFactory
{
    IWorker Worker(string key);
}

/// <summary>The cluster's active silos that host workers, in placement order; the same array while they do not change.</summary>
internal interface IWorkerSilos
{
    string[] Active();
}

/// <summary>One parameter-server shard of a run, as its coordinator drives it (see <see cref="IParameterShardGrain"/>).</summary>
internal interface IShard
{
    Task<ShardPosition> Attach(RunSpec spec, int incarnation, long coordinatorKey);
    Task MoveTo(int incarnation, long coordinatorKey, long session, long step);
    Task Checkpoint(int incarnation, long coordinatorKey, long step);
    Task<ParameterVersion> Pull(long session, long step);
    Task<ParameterVersion> GetParameters();
    Task Retire();
    Task Forget();
}

/// <summary>Shards by key ("{runId}/{j}").</summary>
internal interface IShardFactory
{
    IShard Shard(string key);
}
