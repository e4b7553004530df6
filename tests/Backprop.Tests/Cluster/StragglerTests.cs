using System.Diagnostics;
using Backprop.Client;
using Backprop.Core;
using Backprop.Core.Model;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Messages;
using Xunit.Abstractions;

namespace Backprop.Tests.Cluster;

/// <summary>
/// Straggler naming on real silos: one silo's workers are slowed on purpose (50 ms more per chunk, against a few
/// milliseconds of compute), and the coordinator names them, in the status and in one event, while the run keeps its
/// bits; in a run without a slow silo nobody is named. Silo 0 (the membership primary) holds the coordinator.
/// </summary>
[Collection("cluster")]
public sealed class StragglerTests(ITestOutputHelper output)
{
    // 1,200 samples at batch 48 are 25 steps an epoch, of 6 chunks: 2 for each of the 3 workers (one per silo).
    private static RunSpec Spec(int epochs, long seed) =>
        Presets.PyTorchMlp with { BatchSize = 48, ChunkSize = 8, Epochs = epochs, Workers = 3, Seed = seed };

    private const int SlowSilo = 2;

    [Fact]
    public async Task A_slowed_silos_worker_is_named_a_straggler_in_the_status_and_one_event_and_the_bits_stay()
    {
        await using var slowCluster = new ClusterFixture(1200, 400, computeDelay: i => i == SlowSilo ? TimeSpan.FromMilliseconds(50) : TimeSpan.Zero);
        await slowCluster.InitializeAsync();
        // 100 steps: the straggler is judged from step 50 (WorkerTimes.MinSteps) on. A small model: its compute (a few ms
        // a step, tens on a loaded machine) stays well under the slow silo's extra 100 ms a step.
        var spec = Spec(epochs: 4, seed: 31) with { Model = new ModelSpec([784, 32, 10], Activation.Relu, Loss.CrossEntropy) };
        string slow = slowCluster.Cluster.Silos[SlowSilo].SiloAddress.Endpoint.ToString();
        var status = await RunToEnd(slowCluster, "straggler", spec);

        Assert.Equal(3, status.Workers.Length);
        var named = status.Workers.Where(w => w.Straggler).ToArray();
        var stragglerEvents = status.Events.Where(e => e.Kind == "straggler").ToArray();
        string shown = Describe(status);
        // Worker i is on silo i mod 3 in address order: exactly one worker is on the slow silo, and it is the one named.
        Assert.Equal(slow, Assert.Single(named).Silo);
        Assert.All(status.Workers.Where(w => w.Silo != slow), w => Assert.False(w.Straggler, shown));
        Assert.True(named[0].Slowdown(status.Workers) > WorkerStats.StragglerFactor, shown);
        // Named once: it stayed slow the whole run.
        var named0 = Assert.Single(stragglerEvents);
        Assert.StartsWith($"worker {named[0].Worker} on {slow} is ", named0.Message);
        Assert.Contains("x slower than the median (p95 ", named0.Message);
        Assert.DoesNotContain(status.Events, e => e.Kind == "straggler-cleared");

        string text = Shown(status);
        Assert.Contains($"\n  worker {named[0].Worker} on {slow} is ", text);

        // A slow worker changes when the steps end, never what they compute.
        using var local = new LocalTrainer(spec, slowCluster.Data.Train);
        for (int e = 0; e < spec.Epochs; e++) local.TrainEpoch(e);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), status.Epochs[^1].ParameterSha256);
    }

    [Fact]
    public async Task A_balanced_run_names_no_worker()
    {
        // On one machine the silos share the cores. With one shard, worker 0 shares its silo (both are placed by index)
        // and gets its reply first, then computes while the others' replies are still being serialized: 16 samples a
        // block made it 1.4-1.7x slower than the median. Here every silo holds a shard, so no worker is placed better,
        // and 64 samples a block (batch 192, chunk 32, 2 chunks a worker) make the compute dominate. 4,800 samples are
        // 25 steps an epoch; 4 epochs are 100 steps, judged from step 50 on.
        await using var cluster = new ClusterFixture(4800, 400);
        await cluster.InitializeAsync();
        var status = await RunToEnd(cluster, "balanced", Spec(epochs: 4, seed: 32) with { BatchSize = 192, ChunkSize = 32, ServerShards = 3 });
        string shown = Describe(status);
        Shown(status);
        Assert.Equal(3, status.Workers.Length);
        Assert.Equal(3, status.Workers.Select(w => w.Silo).Distinct().Count());
        // Judged (every worker has enough steps), and nobody named, now or at any time during the run.
        Assert.All(status.Workers, w => Assert.True(w.Blocks >= WorkerTimes.MinSteps && w.ComputeMedianSeconds > 0, shown));
        Assert.All(status.Workers, w => Assert.False(w.Straggler, shown));
        Assert.DoesNotContain(status.Events, e => e.Kind.StartsWith("straggler", StringComparison.Ordinal));
    }

    private static async Task<RunStatus> RunToEnd(ClusterFixture cluster, string runId, RunSpec spec)
    {
        var run = cluster.Cluster.Client.GetGrain<IRunGrain>(runId);
        var status = await cluster.StartOn(cluster.Cluster.Silos[0], runId, spec);
        // A safety net for a loaded 2-core machine, not an expectation of speed.
        var clock = Stopwatch.StartNew();
        while (!status.IsFinished && clock.Elapsed < TimeSpan.FromSeconds(300))
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.True(status.State == RunState.Completed, $"run {runId} ended {status.State}: {status.Error}");
        return status;
    }

    /// <summary>What `status` prints, also into the test's output.</summary>
    private string Shown(RunStatus status)
    {
        var text = new StringWriter();
        RunReporter.PrintStatus(text, status);
        output.WriteLine(text.ToString());
        return text.ToString();
    }

    private static string Describe(RunStatus status) =>
        string.Join("; ", status.Workers.Select(w => $"worker {w.Worker} on {w.Silo}: {w.Blocks} blocks, median {w.ComputeMedianSeconds * 1000:F2} ms, p95 {w.ComputeP95Seconds * 1000:F2} ms{(w.Straggler ? ", straggler" : "")}"))
        + " | " + string.Join("; ", status.Events.Select(e => $"{e.Kind}: {e.Message}"));
}
