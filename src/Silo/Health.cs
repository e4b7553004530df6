using Backprop.Grains.Hosting;
using Microsoft.Extensions.Logging;

namespace Backprop.Silo;

/// <summary>
/// Whether this silo should get traffic: it has joined the cluster (membership says Active) and its data set is
/// loaded and checked. The data set is loaded before the silo joins rather than by the first chunk, so that a
/// silo with missing or damaged data is not ready (and says why) before any run relies on it.
/// The host program says where the silo is in its life (<see cref="Joining"/>, <see cref="Started"/>,
/// <see cref="Leaving"/>): the health endpoints answer from before the data set is loaded until after the silo has
/// left, so membership is asked only while the silo runs.
/// </summary>
public sealed class SiloHealth(IClusterMembershipService membership, ILocalSiloDetails local, DatasetCache datasets, ILogger<SiloHealth> logger)
{
    private Task? _data;
    private string? _dataset;

    private string? _redis;
    private volatile bool _started;

    private enum Phase { Starting, WaitingForRedis, Joining, Running, Leaving }
    private volatile Phase _phase = Phase.Starting;

    /// <summary>The silo waits for its Redis to answer before it joins.</summary>
    public void WaitingForRedis(string redis)
    {
        _redis = redis;
        _phase = Phase.WaitingForRedis;
    }

    /// <summary>The silo is being started: it joins the cluster.</summary>
    public void Joining() => _phase = Phase.Joining;

    /// <summary>The silo has started (joined, or failed to and stops).</summary>
    public void Started()
    {
        _started = true;
        if (_phase == Phase.Joining) _phase = Phase.Running;
    }

    /// <summary>Whether the silo has joined: from then on, stopping means leaving the cluster.</summary>
    public bool HasStarted => _started;

    /// <summary>The silo is stopping: it leaves the cluster (hand-over of its grains, parameter servers checkpoint).</summary>
    public void Leaving() => _phase = Phase.Leaving;

    public void LoadDataset(string dataset)
    {
        _dataset = dataset;
        _data = datasets.Sha256(dataset).ContinueWith(t =>
        {
            if (t.IsFaulted) logger.LogError("Data set {Dataset} could not be loaded: {Error}", dataset, t.Exception!.InnerException!.Message);
            return t;
        }, TaskScheduler.Default).Unwrap();
    }

    /// <summary>Completes when the load has ended, loaded or failed.</summary>
    public Task DatasetLoaded() => _data?.ContinueWith(_ => { }, TaskScheduler.Default) ?? Task.CompletedTask;

    public (bool Ready, string Reason) Readiness()
    {
        switch (_phase)
        {
            case Phase.Starting: return (false, _data is { IsCompleted: false } ? $"loading data set {_dataset}" : "starting");
            case Phase.WaitingForRedis: return (false, $"waiting for Redis {_redis}");
            case Phase.Joining: return (false, "joining");
            case Phase.Leaving: return (false, "leaving");
        }
        var status = membership.CurrentSnapshot.GetSiloStatus(local.SiloAddress);
        if (status != SiloStatus.Active) return (false, $"membership status {status.ToString().ToLowerInvariant()}");
        if (_data is { } data)
        {
            if (data.IsFaulted) return (false, $"data set {_dataset} failed to load: {data.Exception!.InnerException!.Message}");
            if (!data.IsCompletedSuccessfully) return (false, $"loading data set {_dataset}");
        }
        return (true, "ready");
    }
}
