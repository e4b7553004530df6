using Backprop.Core.Training;
using Backprop.Grains.Messages;

namespace Backprop.Grains;

/// <summary>
/// A run's parameter-server shards as its coordinator drives them: attach to all and settle on one version,
/// checkpoint all, move all back, gather the whole vector. Off the step path: the workers push and pull the
/// vectors themselves; the coordinator only says which version comes next.
/// </summary>
internal sealed class ParameterShards
{
    private readonly RunSpec _spec;
    private readonly IShard[] _shards;
    private readonly long _coordinatorKey;

    /// <param name="coordinatorKey">The run record's key of the coordinator driving the run (0: none, only reads).</param>
    public ParameterShards(IShardFactory shardFactory, string runId, RunSpec spec, long coordinatorKey = 0)
    {
        (_spec, _coordinatorKey) = (spec, coordinatorKey);
        _shards = Enumerable.Range(0, spec.ServerShards).Select(j => shardFactory.Shard($"{runId}/{j}")).ToArray();
        Silos = new string[spec.ServerShards];
    }

    /// <summary>The silo of each shard, as they said when attached.</summary>
    public string[] Silos { get; }

    /// <summary>
    /// Takes every shard over for <paramref name="incarnation"/> and moves them all to the latest version each of
    /// them holds (in memory or stored; version 0 always): the run goes on from there.
    /// </summary>
    public async Task<(long Step, double EpochLossSum, long CheckpointStep)> Attach(int incarnation)
    {
        var positions = await Task.WhenAll(_shards.Select(s => s.Attach(_spec, incarnation, _coordinatorKey)));
        for (int j = 0; j < positions.Length; j++) Silos[j] = positions[j].Silo;
        var common = positions[0].Steps.AsEnumerable();
        foreach (var p in positions.Skip(1)) common = common.Intersect(p.Steps);
        long step = common.DefaultIfEmpty(0).Max();
        int at = Array.IndexOf(positions[0].Steps, step);
        double loss = at >= 0 ? positions[0].EpochLossSums[at] : 0;
        Session = Secrets.NewLong();
        await MoveTo(incarnation, step);
        return (step, loss, positions.Min(p => p.CheckpointStep));
    }

    /// <summary>This attach: blocks and pulls of an earlier one (calls given up on, left running) are refused by the shards.</summary>
    public long Session { get; private set; }

    public Task MoveTo(int incarnation, long step) => Task.WhenAll(_shards.Select(s => s.MoveTo(incarnation, _coordinatorKey, Session, step)));

    public Task Checkpoint(int incarnation, long step) => Task.WhenAll(_shards.Select(s => s.Checkpoint(incarnation, _coordinatorKey, step)));

    /// <summary>The run is stored as completed: the shards drop all but the final version.</summary>
    public Task Retire() => Task.WhenAll(_shards.Select(s => s.Retire()));

    /// <summary>The run list is deleting the run: the shards delete their state.</summary>
    public Task Forget() => Task.WhenAll(_shards.Select(s => s.Forget()));

    /// <summary>The whole vector of version <paramref name="step"/> (null: each shard's last), its slices in shard order; all must be of one version.</summary>
    public async Task<ParameterVersion> Gather(long? step)
    {
        var slices = await Task.WhenAll(_shards.Select(s => step is { } v ? s.Pull(Session, v) : s.GetParameters()));
        var layout = _spec.Shards;
        var parameters = new float[layout.Parameters];
        for (int j = 0; j < slices.Length; j++)
        {
            if (slices[j].Step != slices[0].Step)
                throw new InvalidOperationException($"the shards hold different versions ({string.Join(", ", slices.Select(s => s.Step))}): resume the run to settle them");
            if (slices[j].Parameters.Length != layout.Length(j))
                throw new InvalidDataException($"shard {j} holds {slices[j].Parameters.Length} parameters for its {layout.Length(j)}");
            slices[j].Parameters.Span.CopyTo(parameters.AsSpan(layout.Start(j)));
            slices[j].Parameters.Release();
        }
        return new ParameterVersion(slices[0].Step, new FloatPayload(parameters));
    }
}
