using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;
using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// Redis and three real silo processes from deploy/local/cluster.sh, the CLI given all three gateways, and
/// silos killed with SIGKILL mid-run as a machine would die: the CLI reports completion and the parameters
/// are the bits of an uninterrupted run. Then the whole cluster stopped mid-run, started again, and `resume`.
/// </summary>
[Collection("cluster")]
public sealed class ProcessFailoverTests : ClusterWorkspace
{
    private const int Epochs = 3;
    private readonly TrainTest _data = SyntheticDigits.Create(trainCount: 9600, testCount: 400, seed: 21);
    private readonly int _siloPort, _gatewayPort, _redisPort;
    private readonly string _cluster = "failover-" + Guid.NewGuid().ToString("N")[..8];
    private string Gateways => string.Join(',', Enumerable.Range(0, 3).Select(i => $"127.0.0.1:{_gatewayPort + i}"));
    // 150 steps an epoch, a checkpoint every 20: a kill loses some steps, which are recomputed.
    private static RunSpec Spec(long seed, int epochs = Epochs) => Presets.PyTorchMlp with { Epochs = epochs, Workers = 3, Seed = seed, CheckpointEvery = 20 };

    public ProcessFailoverTests() : base("e2e-failover-")
    {
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), _data);
        var taken = new HashSet<int>();
        (_siloPort, _gatewayPort, _redisPort) = (FreePorts(3, taken), FreePorts(3, taken), FreePorts(1, taken));
    }

    private Result StartCluster() => Script(State, "start", "--silos", "3", "--redis", "--redis-port", $"{_redisPort}",
        "--silo-port", $"{_siloPort}", "--gateway-port", $"{_gatewayPort}", "--cluster-id", _cluster, "--data-dir", DataDir);

    private string Expected(long seed, int epochs = Epochs)
    {
        using var local = new LocalTrainer(Spec(seed, epochs), _data.Train);
        for (int e = 0; e < epochs; e++) local.TrainEpoch(e);
        return ParameterHash.Sha256(local.Parameters);
    }

    private CliProcess Train(string runId, string metrics, int epochs = Epochs) => CliProcess.Start("train", "--epochs", $"{epochs}", "--workers", "3",
        "--seed", $"{Spec(0).Seed}", "--checkpoint-every", "20", "--gateway", Gateways, "--cluster-id", _cluster, "--run-id", runId,
        "--metrics-out", metrics);

    /// <summary>The index of the silo (in cluster.sh's numbering) that holds the run's coordinator.</summary>
    private int CoordinatorSilo(string runId)
    {
        var status = Cli("status", runId, "--json", "--gateway", Gateways, "--cluster-id", _cluster);
        Assert.True(status.Code == 0, status.Output);
        var json = StatusJson(status);
        Assert.Equal("running", json.GetProperty("state").GetString());
        // One shard per worker silo by default: the coordinator's silo holds one too, so killing it loses a shard.
        Assert.Equal(3, json.GetProperty("shardSilos").EnumerateArray().Select(s => s.GetString()).Distinct().Count());
        return int.Parse(json.GetProperty("coordinatorSilo").GetString()!.Split(':')[1]) - _siloPort;
    }

    private static JsonElement StatusJson(Result status) =>
        JsonDocument.Parse(status.Output.Split('\n').Single(l => l.StartsWith('{'))).RootElement;

    private static JsonElement[] Metrics(string path) => File.ReadAllLines(path).Select(l => JsonDocument.Parse(l).RootElement).ToArray();

    [Fact]
    public void Killing_the_coordinators_silo_then_the_clients_first_gateway_mid_run_changes_no_bit()
    {
        var started = StartCluster();
        Assert.True(started.Code == 0, started.Output);
        string expected = Expected(Spec(0).Seed);

        // Losing the coordinator's silo costs a resume; losing silo 0 (the client's first gateway, a worker, and
        // perhaps the coordinator) a redo or a resume.
        foreach (var (runId, victimOf, recovery) in new (string, Func<string, int>, string)[]
                 { ("lose-coordinator", CoordinatorSilo, "resumed"), ("lose-gateway", _ => 0, "redone|resumed") })
        {
            string metrics = Path.Combine(Work, runId + ".jsonl");
            var train = Train(runId, metrics);
            train.WaitForLine(l => l.StartsWith("epoch"), TimeSpan.FromSeconds(60));
            int victim = victimOf(runId);
            // The first epoch's row: the run is in epoch 2 of 3.
            train.WaitForLine(l => l.TrimStart().StartsWith("1 "), TimeSpan.FromSeconds(90));
            var killed = Script(State, "kill", $"{victim}");
            Assert.True(killed.Code == 0, killed.Output);

            var result = train.Finish(TimeSpan.FromSeconds(120));
            Assert.True(result.Code == 0, $"{runId} (killed silo-{victim}): {result.Output}");
            var lines = Metrics(metrics);
            Assert.Equal([1, 2, 3], lines.Select(l => l.GetProperty("epoch").GetInt32()));
            Assert.Equal(expected, lines[^1].GetProperty("parameterSha256").GetString());
            var events = StatusJson(Cli("status", runId, "--json", "--gateway", Gateways, "--cluster-id", _cluster)).GetProperty("events");
            Assert.Contains(events.EnumerateArray(), e => recovery.Split('|').Contains(e.GetProperty("kind").GetString()));

            var restarted = Script(State, "restart", $"{victim}");
            Assert.True(restarted.Code == 0, restarted.Output);
        }
    }

    [Fact]
    public void A_run_stopped_with_the_whole_cluster_resumes_after_a_restart_with_the_same_bits()
    {
        // Long enough that stopping the silos one by one (the run goes on on those still up) lands mid-run.
        const int epochs = 16;
        var started = StartCluster();
        Assert.True(started.Code == 0, started.Output);
        var train = Train("whole-cluster", Path.Combine(Work, "before.jsonl"), epochs);
        train.WaitForLine(l => l.TrimStart().StartsWith("1 "), TimeSpan.FromSeconds(90));
        var stopped = Script(State, "stop");
        Assert.True(stopped.Code == 0, stopped.Output);
        train.Interrupt();   // its cluster is gone; the client only detaches
        train.Finish(TimeSpan.FromSeconds(60));

        Assert.InRange(Metrics(Path.Combine(Work, "before.jsonl")).Length, 1, epochs - 1);

        // A restarted cluster may carry on by itself (its watchdogs sweep for running runs) before `resume` asks.
        var again = StartCluster();
        Assert.True(again.Code == 0, again.Output);
        var resumed = Cli("resume", "whole-cluster", "--gateway", Gateways, "--cluster-id", _cluster);
        Assert.True(resumed.Code == 0, resumed.Output);
        var status = Cli("status", "whole-cluster", "--json", "--gateway", Gateways, "--cluster-id", _cluster);
        Assert.True(status.Code == 0, status.Output);
        var json = StatusJson(status);
        Assert.Equal("completed", json.GetProperty("state").GetString());
        var epochResults = json.GetProperty("epochs").EnumerateArray().ToArray();
        Assert.Equal(Enumerable.Range(1, epochs), epochResults.Select(e => e.GetProperty("epoch").GetInt32()));
        Assert.Equal(Expected(Spec(0).Seed, epochs), epochResults[^1].GetProperty("parameterSha256").GetString());
        Assert.Contains(json.GetProperty("events").EnumerateArray(), e => e.GetProperty("kind").GetString() == "resumed");
    }
}
