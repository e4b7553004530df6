using Backprop.Core;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;

namespace Backprop.Tests.Cluster;

/// <summary>Silo 0 is a server, silos 1 and 2 are workers: every grain lands on a silo of its role, and the bits do not change.</summary>
[Collection("cluster")]
public sealed class RoleTests
{
    [Fact]
    public async Task Coordinator_runs_on_the_server_silo_workers_spread_over_the_worker_silos_and_shards_over_all()
    {
        await using var fixture = new ClusterFixture(1200, 400, index => index == 0 ? SiloRole.Server : SiloRole.Worker);
        await fixture.InitializeAsync();
        var client = fixture.Cluster.Client;
        string server = fixture.Cluster.Silos[0].SiloAddress.Endpoint.ToString();
        string[] workerSilos = fixture.Cluster.Silos.Skip(1).Select(s => s.SiloAddress.Endpoint.ToString()).Order(StringComparer.Ordinal).ToArray();

        Assert.Equal(workerSilos, (await client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key).WorkerSilos()).Order(StringComparer.Ordinal));

        var spec = Presets.PyTorchMlp with { Epochs = 1, Workers = 4, Seed = 12, ServerShards = 2 };
        var run = client.GetGrain<IRunGrain>("roles");
        // Asked to put the coordinator on a worker silo, placement must refuse that silo: it lacks the grain class.
        RequestContext.Set(Orleans.Runtime.Placement.IPlacementDirector.PlacementHintKey, fixture.Cluster.Silos[1].SiloAddress);
        RunStatus status;
        try
        {
            status = await run.Start(spec);
        }
        finally
        {
            RequestContext.Clear();
        }
        while (!status.IsFinished) status = await run.WaitForFinish(TimeSpan.FromSeconds(5));

        Assert.True(status.State == RunState.Completed, $"{status.State}: {status.Error}");
        Assert.Equal(server, status.CoordinatorSilo);
        // Shards go to every silo, by shard number: two shards on two of the three.
        Assert.Equal(2, status.ShardSilos.Distinct().Count());
        Assert.Equal(workerSilos, status.WorkerSilos.Order(StringComparer.Ordinal));
        using var local = new LocalTrainer(spec, fixture.Data.Train);
        local.TrainEpoch(0);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), status.Epochs[^1].ParameterSha256);
    }

    [Fact]
    public async Task A_run_waits_while_no_worker_silo_exists_and_goes_on_when_one_joins()
    {
        await using var fixture = new ClusterFixture(1200, 400, index => index == 0 ? SiloRole.Server : SiloRole.Worker);
        await fixture.InitializeAsync();
        var spec = Presets.PyTorchMlp with { Epochs = 30, Workers = 2, Seed = 13, ServerShards = 2, CheckpointEvery = 5 };
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("no-workers");
        await fixture.StartOn(fixture.Cluster.Silos[0], "no-workers", spec);
        var status = await Poll(run, s => s.EpochsDone >= 1);
        Assert.Equal(RunState.Running, status.State);

        // Every worker silo goes (they hold a shard too). The calls fail for longer than every retry budget (30 s): the run
        // must wait, not fail.
        foreach (var silo in fixture.Cluster.Silos.Skip(1).ToArray()) await fixture.Cluster.KillSiloAsync(silo);
        status = await Poll(run, s => s.Events.Any(e => e.Kind == "waiting-for-workers"));
        Assert.Equal(RunState.Running, status.State);

        await fixture.Cluster.StartAdditionalSiloAsync();
        status = await Poll(run, s => s.IsFinished);
        Assert.True(status.State == RunState.Completed, $"{status.State}: {status.Error}");
        Assert.Contains(status.Events, e => e.Kind == "workers-back");
        using var local = new LocalTrainer(spec, fixture.Data.Train);
        for (int e = 0; e < spec.Epochs; e++) local.TrainEpoch(e);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), status.Epochs[^1].ParameterSha256);
        Assert.Equal(Enumerable.Range(1, 30), status.Epochs.Select(e => e.Epoch));
    }

    /// <summary>The run's status; a call the client routed through a killed silo's gateway is asked again.</summary>
    private static async Task<RunStatus> GetStatus(IRunGrain run)
    {
        for (int attempt = 1; ; attempt++)
        {
            try
            {
                return await run.GetStatus();
            }
            catch (Exception e) when (e is Orleans.Runtime.Messaging.ConnectionFailedException or SiloUnavailableException or OrleansMessageRejectionException && attempt < 50)
            {
                await Task.Delay(100);
            }
        }
    }

    /// <summary>Polls for progress (not for an outcome) until <paramref name="reached"/> holds or the run ends.</summary>
    private static async Task<RunStatus> Poll(IRunGrain run, Func<RunStatus, bool> reached)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var status = await GetStatus(run);
        while (!reached(status) && !status.IsFinished && clock.Elapsed < TimeSpan.FromSeconds(300))
        {
            await Task.Delay(20);
            status = await GetStatus(run);
        }
        Assert.True(reached(status), $"run is {status.State}, epoch {status.Epoch + 1}: {status.Error}; events: {string.Join(" | ", status.Events.Select(e => $"{e.Kind}: {e.Message}"))}");
        return status;
    }
}
