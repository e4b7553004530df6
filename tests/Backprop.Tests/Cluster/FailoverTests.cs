using Backprop.Core;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Messages;

namespace Backprop.Tests.Cluster;

/// <summary>A silo holding workers dies mid-run: the run finishes, with the parameters it would have had anyway.</summary>
[Collection("cluster")]
public sealed class FailoverTests : IAsyncLifetime
{
    // Its own cluster: this test kills one of its silos.
    private readonly ClusterFixture _fixture = new();

    public Task InitializeAsync() => _fixture.InitializeAsync();
    public Task DisposeAsync() => _fixture.DisposeAsync();

    [Fact]
    public async Task Killing_a_worker_silo_loses_nothing_and_changes_no_bit()
    {
        // 40 epochs of 19 steps: long enough that the kill lands mid-run.
        var spec = Presets.PyTorchMlp with { Epochs = 40, Workers = 4, Seed = 6 };
        var run = _fixture.Cluster.Client.GetGrain<IRunGrain>("failover");
        var status = await run.Start(spec);

        var deadline = DateTime.UtcNow.AddSeconds(40);
        while (status.Epochs.Length < 2 && !status.IsFinished && DateTime.UtcNow < deadline)
        {
            await Task.Delay(10);   // polling for progress, not waiting for an outcome
            status = await run.GetStatus();
        }
        Assert.Equal(RunState.Running, status.State);

        // Four workers on three silos: every silo holds one; kill one that is not the coordinator's.
        var victim = _fixture.Cluster.Silos.Skip(1).First(s => s.SiloAddress.ToString() != status.CoordinatorSilo);
        await _fixture.Cluster.KillSiloAsync(victim);

        while (!status.IsFinished && DateTime.UtcNow < deadline.AddSeconds(15))
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.True(status.State == RunState.Completed, $"run ended {status.State}: {status.Error}");
        Assert.Equal(40, status.Epochs.Length);

        using var local = new LocalTrainer(spec, _fixture.Data.Train);
        for (int e = 0; e < spec.Epochs; e++) local.TrainEpoch(e);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), status.Epochs[^1].ParameterSha256);
    }
}
