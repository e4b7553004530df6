using System.Diagnostics;
using Backprop.Core;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Messages;

namespace Backprop.Tests.Cluster;

/// <summary>
/// Silos die mid-run: the run finishes by itself, every epoch recorded once, with the parameters it would
/// have had anyway. Each test has its own cluster (it kills silos). Silo 0 is the test cluster's membership
/// primary and is never the victim.
/// </summary>
[Collection("cluster")]
public sealed class FailoverTests
{
    private static string Expected(RunSpec spec, ClusterFixture fixture)
    {
        using var local = new LocalTrainer(spec, fixture.Data.Train);
        for (int e = 0; e < spec.Epochs; e++) local.TrainEpoch(e);
        return ParameterHash.Sha256(local.Parameters);
    }

    // Limits below are generous safety nets for a loaded 2-core machine, not expectations of speed.

    /// <summary>Polls for progress (not for an outcome) until <paramref name="reached"/> holds.</summary>
    private static async Task<RunStatus> WaitUntil(IRunGrain run, Func<RunStatus, bool> reached, TimeSpan limit)
    {
        var clock = Stopwatch.StartNew();
        var status = await run.GetStatus();
        while (!reached(status) && !status.IsFinished && clock.Elapsed < limit)
        {
            await Task.Delay(5);
            status = await run.GetStatus();
        }
        Assert.True(reached(status), $"run reached {status.State}, epoch {status.Epoch + 1} step {status.StepInEpoch}: {status.Error}");
        return status;
    }

    /// <summary>Waits for the end through the run list only, so that no call of the test wakes the run up.</summary>
    private static async Task<RunStatus> WaitForEndWithoutTouching(ClusterFixture fixture, string runId, TimeSpan limit)
    {
        var registry = fixture.Cluster.Client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key);
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < limit)
        {
            var summary = (await registry.List()).Single(r => r.RunId == runId);
            if (summary.State != RunState.Running) break;
            await Task.Delay(50);
        }
        return await fixture.Cluster.Client.GetGrain<IRunGrain>(runId).GetStatus();
    }

    [Fact]
    public async Task Killing_a_worker_silo_loses_nothing_and_changes_no_bit()
    {
        await using var fixture = await Start(new ClusterFixture());
        // 40 epochs of 19 steps: long enough that the kill lands mid-run. Three shards, one per silo: the victim holds
        // one, so some shards may have a dying worker's block and others not, and the lost shard comes back from its checkpoint.
        var spec = Presets.PyTorchMlp with { Epochs = 40, Workers = 4, Seed = 6, ServerShards = 3, CheckpointEvery = 7 };
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("failover");
        await fixture.StartOn(fixture.Cluster.Silos[0], "failover", spec);
        var status = await WaitUntil(run, s => s.EpochsDone >= 2, TimeSpan.FromSeconds(120));
        Assert.Equal(RunState.Running, status.State);

        // Four workers on three silos: every silo holds one.
        string dead = fixture.Cluster.Silos[1].SiloAddress.Endpoint.ToString();
        Assert.Contains(dead, status.ShardSilos);
        await fixture.Cluster.KillSiloAsync(fixture.Cluster.Silos[1]);

        var clock = Stopwatch.StartNew();
        while (!status.IsFinished && clock.Elapsed < TimeSpan.FromSeconds(300))
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.True(status.State == RunState.Completed, $"run ended {status.State}: {status.Error}");
        Assert.Equal(40, status.EpochsDone);
        Assert.Equal(Expected(spec, fixture), status.Epochs[^1].ParameterSha256);
        // Either a call in flight failed and was redone elsewhere, or the next step already spread new workers over the survivors.
        Assert.Contains(status.Events, e => e.Kind == "redone" || e.Kind == "workers" && !e.Message.Contains(dead));
        // Its shard was lost with it: the coordinator attached to the shards again and recomputed from a common version.
        Assert.Contains(status.Events, e => e.Kind == "server-lost");
        Assert.DoesNotContain(dead, status.ShardSilos);
    }

    [Fact]
    public async Task Killing_a_silo_that_holds_only_a_worker_mid_window_keeps_the_steps_the_others_confirmed()
    {
        await using var fixture = await Start(new ClusterFixture());
        // One shard, the coordinator on silo 0; the victim is the silo that holds neither: only its worker's window call
        // fails. The others stop at the step its block is missing from, the steps they confirmed stand, and the run goes
        // on one step a call with the block redone elsewhere, without attaching to the shards again.
        var spec = Presets.PyTorchMlp with { Epochs = 40, Workers = 3, Seed = 12, ServerShards = 1, CheckpointEvery = 1000 };
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("lose-worker-only");
        await fixture.StartOn(fixture.Cluster.Silos[0], "lose-worker-only", spec);
        var status = await WaitUntil(run, s => s.EpochsDone >= 2 && s.WorkerSilos.Length == 3, TimeSpan.FromSeconds(120));
        var victim = fixture.Cluster.Silos.Skip(1).First(s => !status.ShardSilos.Contains(s.SiloAddress.Endpoint.ToString()));
        await fixture.Cluster.KillSiloAsync(victim);

        var clock = Stopwatch.StartNew();
        while (!status.IsFinished && clock.Elapsed < TimeSpan.FromSeconds(300))
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.True(status.State == RunState.Completed, $"run ended {status.State}: {status.Error}");
        Assert.Equal(Expected(spec, fixture), status.Epochs[^1].ParameterSha256);
        string events = string.Join("; ", status.Events.Select(e => $"{e.Kind}: {e.Message}"));
        // The kill landed in a window (the run spends nearly all its time in them) or the next window already went to
        // a new generation of workers; either way the shards were never attached again.
        Assert.True(status.Events.Any(e => e.Kind == "worker-failed") || status.Events.Any(e => e.Kind == "workers" && e.Message.Contains("generation 1")), events);
        Assert.DoesNotContain(status.Events, e => e.Kind is "server-lost" or "resumed");
    }

    [Fact]
    public async Task Stopping_the_coordinators_silo_cleanly_moves_the_run_to_a_survivor()
    {
        await using var fixture = await Start(new ClusterFixture());
        var spec = Presets.PyTorchMlp with { Epochs = 4, Workers = 3, Seed = 9, CheckpointEvery = 7 };
        var victim = fixture.Cluster.Silos[2];
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("stop-coordinator");
        await fixture.StartOn(victim, "stop-coordinator", spec);
        await WaitUntil(run, s => s.Epoch == 1 && s.StepInEpoch >= 5, TimeSpan.FromSeconds(120));

        await fixture.Cluster.StopSiloAsync(victim);
        var status = await WaitForEndWithoutTouching(fixture, "stop-coordinator", TimeSpan.FromSeconds(300));

        Assert.True(status.State == RunState.Completed, $"run ended {status.State}: {status.Error}");
        Assert.NotEqual(victim.SiloAddress.Endpoint.ToString(), status.CoordinatorSilo);
        Assert.Equal([1, 2, 3, 4], status.Epochs.Select(e => e.Epoch));
        Assert.Equal(Expected(spec, fixture), status.Epochs[^1].ParameterSha256);
        Assert.Contains(status.Events, e => e.Kind == "resumed");
    }

    [Fact]
    public async Task Killing_the_coordinator_and_server_silo_mid_epoch_resumes_by_itself_with_the_same_bits()
    {
        await using var fixture = await Start(new ClusterFixture());
        // Checkpoints every 5 steps: the kill loses the steps since the last one, which are recomputed. Three shards,
        // one per silo: the victim holds one of them mid-step too. The gradient is clipped, so the shards' steps also
        // wait for each other's norm parts (shard 0 adds them up); whether the kill lands in that wait is left to chance.
        var spec = Presets.PyTorchMlp with { Epochs = 5, Workers = 3, Seed = 7, CheckpointEvery = 5, ServerShards = 3, ClipNorm = 0.05 };
        var victim = fixture.Cluster.Silos[1];
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("lose-coordinator");
        await fixture.StartOn(victim, "lose-coordinator", spec);
        var before = await WaitUntil(run, s => s.Epoch == 1 && s.StepInEpoch >= 8, TimeSpan.FromSeconds(120));
        Assert.Contains(victim.SiloAddress.Endpoint.ToString(), before.ShardSilos);

        await fixture.Cluster.KillSiloAsync(victim);
        var status = await WaitForEndWithoutTouching(fixture, "lose-coordinator", TimeSpan.FromSeconds(300));

        Assert.True(status.State == RunState.Completed, $"run ended {status.State}: {status.Error}");
        Assert.NotEqual(victim.SiloAddress.Endpoint.ToString(), status.CoordinatorSilo);
        Assert.Equal([1, 2, 3, 4, 5], status.Epochs.Select(e => e.Epoch));
        Assert.Equal(Expected(spec, fixture), status.Epochs[^1].ParameterSha256);
        Assert.NotEqual(Expected(spec with { ClipNorm = 0 }, fixture), status.Epochs[^1].ParameterSha256);   // the bound clips
        var resumed = Assert.Single(status.Events, e => e.Kind == "resumed");
        Assert.Contains("epoch 2", resumed.Message);
    }

    [Fact]
    public async Task Killing_a_worker_silo_during_evaluation_redoes_its_part_and_counts_every_test_sample_once()
    {
        // A large test set and wider layers make evaluation the long part of an epoch, so the kill lands in it.
        await using var fixture = await Start(new ClusterFixture(trainCount: 640, testCount: 60_000));
        var spec = Presets.PyTorchMlp with
        {
            Model = Presets.PyTorchMlp.Model with { Layers = [784, 512, 256, 10] }, Epochs = 2, Workers = 3, Seed = 8,
        };
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("lose-evaluator");
        await fixture.StartOn(fixture.Cluster.Silos[0], "lose-evaluator", spec);
        await WaitUntil(run, s => s.StepsPerEpoch > 0 && s.StepInEpoch == s.StepsPerEpoch, TimeSpan.FromSeconds(120));
        var killClock = Stopwatch.StartNew();
        await fixture.Cluster.KillSiloAsync(fixture.Cluster.Silos[1]);
        var killTook = killClock.Elapsed;

        var status = await run.GetStatus();
        var clock = Stopwatch.StartNew();
        while (!status.IsFinished && clock.Elapsed < TimeSpan.FromSeconds(300))
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.True(status.State == RunState.Completed, $"run ended {status.State}: {status.Error}; epoch {status.Epoch + 1} step {status.StepInEpoch}; " +
            string.Join("; ", status.Events.Select(e => $"{e.Time:HH:mm:ss.fff} {e.Kind} {e.Message}")));
        Assert.True(status.Events.Any(e => e.Kind == "redone" && e.Message.StartsWith("evaluation of test samples")),
            $"the kill ({killTook.TotalSeconds:F2} s) missed the evaluation: {string.Join("; ", status.Events.Select(e => $"{e.Time:HH:mm:ss.fff} {e.Kind} {e.Message}"))}");
        Assert.All(status.Epochs, e => Assert.Equal(60_000, e.Confusion.Sum()));
        Assert.Equal(Expected(spec, fixture), status.Epochs[^1].ParameterSha256);
    }

    private static async Task<ClusterFixture> Start(ClusterFixture fixture)
    {
        await fixture.InitializeAsync();
        return fixture;
    }
}
