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
}
