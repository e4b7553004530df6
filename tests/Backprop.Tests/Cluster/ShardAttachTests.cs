using System.Diagnostics;
using Backprop.Core;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Messages;

namespace Backprop.Tests.Cluster;

/// <summary>A shard accepts an attach only from the coordinator its run's stored record names.</summary>
[Collection("cluster")]
public sealed class ShardAttachTests(ClusterFixture fixture)
{
    [Fact]
    public async Task A_hostile_attach_is_refused_and_the_runs_it_aimed_at_train_to_the_bits_of_a_single_process()
    {
        var client = fixture.Cluster.Client;
        var spec = Presets.PyTorchMlp with { Epochs = 3, Workers = 2, Seed = 31, ServerShards = 2 };
        var run = client.GetGrain<IRunGrain>("hostile-attach");
        await run.Start(spec);
        await PollUntil(run, s => s.Step > 0);

        var shard = client.GetGrain<IParameterShardGrain>("hostile-attach/1");
        // int.MaxValue used to be stored as the shard's fence: the coordinator's blocks were refused as stale for good.
        var huge = await Assert.ThrowsAsync<ArgumentException>(() => shard.Attach(spec, int.MaxValue, 0));
        Assert.Contains($"incarnation {int.MaxValue} is not run 'hostile-attach''s (its record holds 1)", huge.Message);
        Assert.Equal(RunState.Running, (await run.GetStatus()).State);
        // The run's own incarnation is no secret; without the record's coordinator key it knocks nothing off.
        var guessed = await Assert.ThrowsAsync<ArgumentException>(() => shard.Attach(spec, 1, 12345));
        Assert.Contains("is not run 'hostile-attach''s coordinator", guessed.Message);
        // Nor can it move the shard (a new session refuses every block of the coordinator's) or rotate its checkpoint slots.
        Assert.Contains("not the coordinator that attached", (await Assert.ThrowsAsync<ArgumentException>(() => shard.MoveTo(1, 12345, 99, 0))).Message);
        Assert.Contains("not the coordinator that attached", (await Assert.ThrowsAsync<ArgumentException>(() => shard.Checkpoint(1, 12345, 0))).Message);
        Assert.Contains("holds a different run", (await Assert.ThrowsAsync<ArgumentException>(() => shard.Attach(spec with { Seed = 32 }, 1, 0))).Message);
        // Keys that placement would read as shard 1 are not shards of the run.
        Assert.Contains("is not {run id}/{shard number}", (await Assert.ThrowsAsync<ArgumentException>(() =>
            client.GetGrain<IParameterShardGrain>("hostile-attach/01").Attach(spec, 1, 0))).Message);

        // A run id not started yet used to get a shard of the hostile spec, which the real run's coordinator was then refused.
        var later = spec with { Epochs = 1, Seed = 33 };
        var unknown = await Assert.ThrowsAsync<ArgumentException>(() =>
            client.GetGrain<IParameterShardGrain>("not-started-yet/0").Attach(later with { Seed = 34 }, 1, 0));
        Assert.Contains("no run 'not-started-yet' is stored", unknown.Message);

        var status = await WaitForEnd(run);
        Assert.Equal(Expected(spec), status.Epochs[^1].ParameterSha256);
        var laterRun = client.GetGrain<IRunGrain>("not-started-yet");
        await laterRun.Start(later);
        status = await WaitForEnd(laterRun);
        Assert.Equal(Expected(later), status.Epochs[^1].ParameterSha256);

        // A finished run has no coordinator: even its own incarnation is refused.
        Assert.Contains("is completed", (await Assert.ThrowsAsync<StaleCoordinatorException>(() => shard.Attach(spec, 1, 0))).Message);
    }

    private string Expected(RunSpec spec)
    {
        using var local = new LocalTrainer(spec, fixture.Data.Train);
        for (int e = 0; e < spec.Epochs; e++) local.TrainEpoch(e);
        return ParameterHash.Sha256(local.Parameters);
    }

    /// <summary>Polls for progress until <paramref name="reached"/> holds (or the run ended).</summary>
    private static async Task PollUntil(IRunGrain run, Func<RunStatus, bool> reached)
    {
        var clock = Stopwatch.StartNew();
        var status = await run.GetStatus();
        while (!reached(status) && !status.IsFinished && clock.Elapsed < TimeSpan.FromSeconds(120))
        {
            await Task.Delay(5);
            status = await run.GetStatus();
        }
        Assert.True(reached(status), $"run is {status.State}, epoch {status.Epoch + 1} step {status.StepInEpoch}: {status.Error}");
    }

    private static async Task<RunStatus> WaitForEnd(IRunGrain run)
    {
        var clock = Stopwatch.StartNew();
        var status = await run.GetStatus();
        while (!status.IsFinished && clock.Elapsed < TimeSpan.FromSeconds(120))
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.True(status.State == RunState.Completed, $"{status.State}: {status.Error}");
        return status;
    }
}
