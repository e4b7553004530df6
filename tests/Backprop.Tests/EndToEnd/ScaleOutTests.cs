using System.Diagnostics;
using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;
using Xunit.Abstractions;
using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// The manifests' topology as processes: Redis, one server silo and two worker silos, each on its own loopback
/// address with the same ports (cluster.sh --distinct-addresses), configured by environment variables only.
/// A worker silo joins mid-run and gets work; another leaves with SIGTERM; the parameters are still the bits of
/// one uninterrupted process, and the run's coordinator and parameter server stay active throughout (their
/// registrations are in Redis, not in a worker silo's share of Orleans' default directory).
/// </summary>
[Collection("cluster")]
public sealed class ScaleOutTests(ITestOutputHelper output) : ClusterWorkspace("e2e-scale-")
{
    // 150 steps an epoch: 25 epochs leave time for a silo to start and join while the run goes on.
    private const int Epochs = 25;
    private readonly TrainTest _data = SyntheticDigits.Create(trainCount: 9600, testCount: 400, seed: 23);
    private readonly string _cluster = "scale-" + Guid.NewGuid().ToString("N")[..8];

    [Fact]
    public async Task Worker_silos_join_and_leave_a_running_run_without_changing_a_bit()
    {
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), _data);
        var taken = new HashSet<int>();
        int siloPort = FreePorts(1, taken), gatewayPort = FreePorts(1, taken), httpPort = FreePorts(1, taken), redisPort = FreePorts(1, taken);
        string redis = $"127.0.0.1:{redisPort}";
        var started = Script(State, "start", "--redis", "--redis-port", $"{redisPort}", "--servers", "1", "--workers", "2", "--distinct-addresses",
            "--silo-port", $"{siloPort}", "--gateway-port", $"{gatewayPort}", "--http-port", $"{httpPort}", "--cluster-id", _cluster, "--data-dir", DataDir);
        Assert.True(started.Code == 0, started.Output);
        string Silo(int i) => $"127.0.0.{i + 2}:{siloPort}";

        // 4 workers, one per chunk of a step (batch 64, chunk 16): each computes a block of one chunk, so every worker silo
        // computes, whether there are 2 or 3 (with one worker per worker silo, 3 workers share 4 chunks as 2 aligned
        // blocks of 2, and the third silo would only evaluate).
        string metrics = Path.Combine(Work, "metrics.jsonl");
        // One shard, kept on the server silo: this test is about worker silos coming and going without a resume (a silo
        // holding a shard going away costs a re-attach: ProcessFailoverTests and FailoverTests cover that).
        var train = CliProcess.Start("train", "--epochs", $"{Epochs}", "--workers", "4", "--server-shards", "1", "--seed", "5", "--checkpoint-every", "50",
            "--redis", redis, "--redis-password-file", Path.Combine(State, "redis.password"), "--cluster-id", _cluster, "--run-id", "elastic", "--metrics-out", metrics);
        train.WaitForLine(l => l.TrimStart().StartsWith("1 "), TimeSpan.FromSeconds(120));
        var status = Status(redis);
        Assert.Equal(Silo(0), status.GetProperty("coordinatorSilo").GetString());
        // One shard, on the first silo in address order: the server silo.
        Assert.Equal([Silo(0)], status.GetProperty("shardSilos").EnumerateArray().Select(s => s.GetString()));
        Assert.Equal([Silo(1), Silo(2)], WorkerSilos(status));

        var added = Script(State, "add", "worker");
        Assert.True(added.Code == 0, added.Output);
        var sinceJoin = Stopwatch.StartNew();
        // Its own address and the HTTP port every silo shares: ready once it has joined and loaded the data.
        Assert.Equal(System.Net.HttpStatusCode.OK, (await HealthTests.PollReady("127.0.0.5", httpPort, r => r.Code == System.Net.HttpStatusCode.OK)).Code);
        while (!WorkerSilos(status = Status(redis)).Contains(Silo(3)) && status.GetProperty("state").GetString() == "running"
               && sinceJoin.Elapsed < TimeSpan.FromSeconds(60)) { }
        var joinedAfter = sinceJoin.Elapsed;
        Assert.True(WorkerSilos(status).Contains(Silo(3)), $"silo-3 got no work: {status}");
        Assert.Equal("running", status.GetProperty("state").GetString());
        int stepAtJoin = status.GetProperty("step").GetInt32();

        var termed = Script(State, "term", "1");
        Assert.True(termed.Code == 0, termed.Output);
        Assert.Equal("running", Status(redis).GetProperty("state").GetString());
        // Read while the run goes: a completed run's shards let their activations go (and their directory entries).
        string[] directory = DirectoryKeys(redisPort);

        var result = train.Finish(TimeSpan.FromSeconds(240));
        Assert.True(result.Code == 0, result.Output);
        var lines = File.ReadAllLines(metrics).Select(l => JsonDocument.Parse(l).RootElement).ToArray();
        Assert.Equal(Enumerable.Range(1, Epochs), lines.Select(l => l.GetProperty("epoch").GetInt32()));
        using var local = new LocalTrainer(Presets.PyTorchMlp with { Epochs = Epochs, Workers = 2, Seed = 5 }, _data.Train);
        for (int e = 0; e < Epochs; e++) local.TrainEpoch(e);
        string expected = ParameterHash.Sha256(local.Parameters);
        Assert.Equal(expected, lines[^1].GetProperty("parameterSha256").GetString());

        var eventList = Status(redis).GetProperty("events").EnumerateArray().ToArray();
        var events = eventList.Select(e => $"{e.GetProperty("time").GetString()} {e.GetProperty("kind").GetString()}: {e.GetProperty("message").GetString()}");
        // The coordinator and the parameter server are registered in Redis (RunDirectory), not in a directory partition a
        // worker silo holds: neither a silo joining nor one leaving deactivates them, so the run never attaches again.
        Assert.DoesNotContain(eventList, e => e.GetProperty("kind").GetString() is "resumed" or "server-lost");
        Assert.Contains($"{_cluster}/directory/run/elastic", directory);
        Assert.Contains($"{_cluster}/directory/parametershard/elastic/0", directory);
        output.WriteLine(File.ReadLines(Path.Combine(State, "silo-3.log")).First(l => l.Contains("silo-3 up")));
        output.WriteLine($"silo-3 (worker) up -> its endpoint in workerSilos: {joinedAfter.TotalSeconds:F2} s (status polled by CLI processes), at step {stepAtJoin}");
        output.WriteLine(termed.Output.Trim());
        output.WriteLine(string.Join('\n', events));
        output.WriteLine("Redis directory: " + string.Join(", ", directory));
        output.WriteLine($"parameterSha256 after {Epochs} epochs: {lines[^1].GetProperty("parameterSha256").GetString()} (LocalTrainer: {expected})");
    }

    private JsonElement Status(string redis)
    {
        var status = Cli("status", "elastic", "--json", "--redis", redis, "--redis-password-file", Path.Combine(State, "redis.password"), "--cluster-id", _cluster);
        Assert.True(status.Code == 0, status.Output);
        return JsonDocument.Parse(status.Output.Split('\n').Single(l => l.StartsWith('{'))).RootElement;
    }

    /// <summary>The grain directory's keys in the cluster's Redis (redis-cli, the password from the environment, never an argument).</summary>
    private string[] DirectoryKeys(int redisPort)
    {
        var psi = new ProcessStartInfo("redis-cli") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { "-p", $"{redisPort}", "--scan", "--pattern", $"{_cluster}/directory/*" }) psi.ArgumentList.Add(a);
        psi.Environment["REDISCLI_AUTH"] = File.ReadAllText(Path.Combine(State, "redis.password")).Trim();
        using var cli = Process.Start(psi)!;
        string keys = cli.StandardOutput.ReadToEnd();
        cli.WaitForExit();
        Assert.True(cli.ExitCode == 0, cli.StandardError.ReadToEnd());
        return keys.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Order(StringComparer.Ordinal).ToArray();
    }

    private static string[] WorkerSilos(JsonElement status) =>
        status.GetProperty("workerSilos").EnumerateArray().Select(s => s.GetString()!).Order(StringComparer.Ordinal).ToArray();
}
