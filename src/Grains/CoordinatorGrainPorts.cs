using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;

namespace Backprop.Grains;

/// <summary>A coordinator's record in grain storage (see <see cref="StateWrites.WriteAuthoritative"/>).</summary>
internal sealed class GrainStoredState<T>(IPersistentState<T> state) : IStoredState<T>
{
    public T State
    {
        get => state.State;
        set => state.State = value;
    }

    public Task Write() => state.WriteStateAsync();

    public Task WriteAuthoritative(Func<T, T, bool>? superseded = null) => state.WriteAuthoritative(superseded);
}

/// <summary>The run list, the workers and the shards a coordinator drives (CoordinatorPorts.cs), as grains.</summary>
internal sealed class CoordinatorGrainPorts(IGrainFactory grains) : IRunList, IWorkerFactory, IShardFactory
{
    public Task Update(RunSummary summary) => grains.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key).Update(summary);

    public IWorker Worker(string key) => new WorkerGrainPort(grains.GetGrain<IWorkerGrain>(key));

    public IShard Shard(string key) => new ShardGrainPort(grains.GetGrain<IParameterShardGrain>(key));
}

/// <summary>A worker grain; a record, so that two ports of one grain are equal as its references are.</summary>
internal sealed record WorkerGrainPort(IWorkerGrain Grain) : IWorker
{
    public Task<BlockDone> ComputeBlock(BlockWork work) => Grain.ComputeBlock(work);
    public Task<Evaluation> Evaluate(EvalWork work) => Grain.Evaluate(work);
}

/// <summary>A parameter-server shard grain.</summary>
internal sealed record ShardGrainPort(IParameterShardGrain Grain) : IShard
{
    public Task<ShardPosition> Attach(RunSpec spec, int incarnation, long coordinatorKey) => Grain.Attach(spec, incarnation, coordinatorKey);
    public Task MoveTo(int incarnation, long coordinatorKey, long session, long step) => Grain.MoveTo(incarnation, coordinatorKey, session, step);
    public Task Checkpoint(int incarnation, long coordinatorKey, long step) => Grain.Checkpoint(incarnation, coordinatorKey, step);
    public Task<ParameterVersion> Pull(long session, long step) => Grain.Pull(session, step);
    public Task<ParameterVersion> GetParameters() => Grain.GetParameters();
    public Task Retire() => Grain.Retire();
    public Task Forget() => Grain.Forget();
}
