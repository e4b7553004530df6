using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// A silo started with --kubernetes as in a pod: it advertises POD_IP (not the lowest address of its interfaces),
/// listens on all addresses and is named after POD_NAME, and a client finds it through Redis and trains through it.
/// The pod is a network namespace of its own (root, `ip netns`) whose loopback also holds 10.99.0.1 and 10.99.0.2,
/// so that listening on 0.0.0.0 is reachable from nothing outside the test. Without POD_IP: exit 2, one line.
/// </summary>
[Collection("cluster")]
public sealed class KubernetesEndpointTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("k8s-").FullName;
    private readonly string _netns = "bp-test-" + Guid.NewGuid().ToString("N")[..8];

    public KubernetesEndpointTests()
    {
        Ip("netns", "add", _netns);
        Ip("-n", _netns, "link", "set", "lo", "up");
        Ip("-n", _netns, "addr", "add", "10.99.0.1/32", "dev", "lo");
        Ip("-n", _netns, "addr", "add", "10.99.0.2/32", "dev", "lo");
    }

    public void Dispose()
    {
        Ip("netns", "del", _netns);
        Directory.Delete(_work, recursive: true);
    }

    private static string Ip(params string[] args)
    {
        var result = Processes.Run("ip", args);
        Assert.True(result.Code == 0, $"ip {string.Join(' ', args)}: {result.Output}");
        return result.Output;
    }

    [Fact]
    public void A_pod_silo_advertises_POD_IP_listens_on_all_addresses_and_a_client_trains_through_it()
    {
        var data = SyntheticDigits.Create(trainCount: 320, testCount: 100, seed: 8);
        string dataDir = Path.Combine(_work, "data");
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(dataDir, "mnist"), data);
        string cluster = "k8s-" + Guid.NewGuid().ToString("N")[..8];
        // The namespace is the test's alone: fixed ports.
        using var redis = LoggedProcess.Redis(Path.Combine(_work, "redis"), ["--bind", "127.0.0.1", "--port", "6379"], _netns);
        using var silo = LoggedProcess.Silo(["--kubernetes", "--redis", "127.0.0.1:6379", "--cluster-id", cluster, "--data-dir", dataDir],
            new() { ["POD_IP"] = "10.99.0.2", ["POD_NAME"] = "backprop-worker-5d8f-x2x9q" }, _netns);
        string up = silo.WaitForLine(l => l.Contains(" up: role all"), TimeSpan.FromSeconds(90));
        Assert.Contains("backprop-worker-5d8f-x2x9q up:", up);
        Assert.Contains("host 10.99.0.2 (POD_IP; listening on all addresses), silo port 11111, gateway port 30000", up);

        // Listening on every address of the pod: the silo and gateway ports on 0.0.0.0.
        string listening = Ip("netns", "exec", _netns, "ss", "-ltnH");
        Assert.Contains("0.0.0.0:11111", listening);
        Assert.Contains("0.0.0.0:30000", listening);

        string metrics = Path.Combine(_work, "metrics.jsonl");
        using (var train = LoggedProcess.Cli(["train", "--preset", "pytorch-mlp", "--epochs", "1", "--workers", "1", "--seed", "2",
            "--redis", "127.0.0.1:6379", "--cluster-id", cluster, "--run-id", "pod-run", "--metrics-out", metrics], netns: _netns))
        {
            var trained = train.Finish(TimeSpan.FromSeconds(180));
            Assert.True(trained.Code == 0, trained.Output);
        }
        var local = new LocalTrainer(Presets.PyTorchMlp with { Seed = 2, Workers = 1, Epochs = 1 }, data.Train);
        local.TrainEpoch(0);
        var line = JsonDocument.Parse(File.ReadAllLines(metrics).Single()).RootElement;
        Assert.Equal(ParameterHash.Sha256(local.Parameters), line.GetProperty("parameterSha256").GetString());

        // Membership, and so every client and silo, knows the silo by POD_IP (10.99.0.1 is the lower address).
        using var status = LoggedProcess.Cli(["status", "pod-run", "--json", "--redis", "127.0.0.1:6379", "--cluster-id", cluster], netns: _netns);
        var reported = status.Finish(TimeSpan.FromSeconds(60));
        Assert.True(reported.Code == 0, reported.Output);
        var json = JsonDocument.Parse(reported.Output).RootElement;
        Assert.Equal("10.99.0.2:11111", json.GetProperty("coordinatorSilo").GetString());

        silo.Terminate();
        var stopped = silo.Finish(TimeSpan.FromSeconds(90));
        Assert.True(stopped.Code == 0, stopped.Output);
    }

    [Theory]
    [InlineData(null, "error: --kubernetes: POD_IP is not set (give the pod's IP from the downward API: fieldRef status.podIP)")]
    [InlineData("pod-ip", "error: --kubernetes: POD_IP 'pod-ip' is not an IP address")]
    public void Without_a_POD_IP_the_silo_exits_2_with_one_line(string? podIp, string expected)
    {
        var env = new Dictionary<string, string> { ["POD_NAME"] = "backprop-server-0" };
        env["POD_IP"] = podIp ?? "";   // set and empty: the test's own environment may hold one
        using var silo = LoggedProcess.Silo(["--kubernetes", "--redis", "127.0.0.1:6379", "--data-dir", Path.Combine(_work, "data")], env);
        var result = silo.Finish(TimeSpan.FromSeconds(60));
        Assert.Equal(2, result.Code);
        Assert.Equal(expected, Assert.Single(result.Output.Trim().Split('\n')));
    }
}
