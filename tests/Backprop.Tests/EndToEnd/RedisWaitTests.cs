using System.Net;
using Backprop.Core.Data;
using Backprop.Grains.Hosting;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// Silos and clients started before their Redis or their cluster, as in a Kubernetes namespace applied at once: a silo
/// waits for Redis (--redis-wait) instead of exiting, a client waits for the cluster (--connect-timeout), each saying
/// why in one line per try. Redis is named by a host name (localhost), which StackExchange.Redis resolves itself.
/// </summary>
[Collection("cluster")]
public sealed class RedisWaitTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("redis-wait-").FullName;
    private string DataDir => Path.Combine(_work, "data");

    public RedisWaitTests() =>
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), SyntheticDigits.Create(trainCount: 100, testCount: 20, seed: 6));

    public void Dispose() => Directory.Delete(_work, recursive: true);

    [Fact]
    public async Task A_silo_started_before_redis_waits_for_it_and_becomes_ready()
    {
        var taken = new HashSet<int>();
        int redisPort = Processes.FreePorts(1, taken), http = Processes.FreePorts(1, taken);
        string cluster = "wait-" + Guid.NewGuid().ToString("N")[..8];
        using var silo = LoggedProcess.Silo(["--redis", $"localhost:{redisPort}", "--cluster-id", cluster, "--data-dir", DataDir,
            "--silo-port", Processes.FreePorts(1, taken).ToString(), "--gateway-port", Processes.FreePorts(1, taken).ToString(), "--http-port", http.ToString()]);

        // Nothing listens on the port yet: the silo says so and waits.
        string waiting = silo.WaitForLine(l => l.Contains($"waiting for Redis localhost:{redisPort}"), TimeSpan.FromSeconds(90));
        Assert.Contains("Connection refused", waiting);
        var notReady = await HealthTests.PollReady("127.0.0.1", http, r => r.Body.Contains("waiting for Redis"));
        Assert.Equal(HttpStatusCode.ServiceUnavailable, notReady.Code);
        Assert.Equal($"not ready: waiting for Redis localhost:{redisPort}", notReady.Body.Trim());

        using var redis = LoggedProcess.Redis(Path.Combine(_work, "redis"), ["--bind", "127.0.0.1", "--port", redisPort.ToString()]);
        var ready = await HealthTests.PollReady("127.0.0.1", http, r => r.Code == HttpStatusCode.OK);
        Assert.Equal("ready", ready.Body.Trim());
        Assert.Contains($"redis localhost:{redisPort}", silo.WaitForLine(l => l.Contains(" up: role all"), TimeSpan.FromSeconds(30)));

        silo.Terminate();
        var stopped = silo.Finish(TimeSpan.FromSeconds(90));
        Assert.True(stopped.Code == 0, stopped.Output);
    }

    [Fact]
    public void A_silo_that_may_not_wait_for_redis_exits_1_with_one_line()
    {
        int redisPort = Processes.FreePorts(1, []);
        using var silo = LoggedProcess.Silo(["--redis", $"127.0.0.1:{redisPort}", "--redis-wait", "0", "--data-dir", DataDir,
            "--silo-port", Processes.FreePorts(1, []).ToString(), "--gateway-port", Processes.FreePorts(1, []).ToString()]);
        var result = silo.Finish(TimeSpan.FromSeconds(90));

        Assert.Equal(1, result.Code);
        Assert.DoesNotContain("waiting for Redis", result.Output);
        Assert.StartsWith($"error: cannot connect to Redis 127.0.0.1:{redisPort} (no password given): cannot open a connection (Connection refused)",
            Assert.Single(result.Output.Split('\n'), l => l.StartsWith("error:", StringComparison.Ordinal)));
    }

    [Fact]
    public void A_client_started_before_redis_and_any_silo_connects_once_a_silo_is_up()
    {
        var taken = new HashSet<int>();
        int redisPort = Processes.FreePorts(1, taken);
        string cluster = "wait-" + Guid.NewGuid().ToString("N")[..8];
        using var client = LoggedProcess.Cli(["runs", "--redis", $"localhost:{redisPort}", "--cluster-id", cluster, "--connect-timeout", "600"]);
        Assert.Contains("cannot open a connection (Connection refused)",
            client.WaitForLine(l => l.StartsWith($"waiting for cluster '{cluster}' via Redis localhost:{redisPort}: ", StringComparison.Ordinal), TimeSpan.FromSeconds(90)));

        using var redis = LoggedProcess.Redis(Path.Combine(_work, "redis"), ["--bind", "127.0.0.1", "--port", redisPort.ToString()]);
        using var silo = LoggedProcess.Silo(["--redis", $"127.0.0.1:{redisPort}", "--cluster-id", cluster, "--data-dir", DataDir,
            "--silo-port", Processes.FreePorts(1, taken).ToString(), "--gateway-port", Processes.FreePorts(1, taken).ToString()]);
        silo.WaitForLine(l => l.Contains(" up: role all"), TimeSpan.FromSeconds(90));

        var listed = client.Finish(TimeSpan.FromSeconds(120));
        Assert.True(listed.Code == 0, listed.Output);
        Assert.Contains($"no runs in cluster '{cluster}'", listed.Output);
        Assert.DoesNotContain("error:", listed.Output);

        silo.Terminate();
        Assert.Equal(0, silo.Finish(TimeSpan.FromSeconds(90)).Code);
    }

    [Fact]
    public void A_client_gives_up_after_its_connect_timeout_with_one_error_line()
    {
        int redisPort = Processes.FreePorts(1, []);
        var result = Processes.Cli("runs", "--redis", $"127.0.0.1:{redisPort}", "--cluster-id", "nowhere", "--connect-timeout", "3");
        Assert.Equal(1, result.Code);
        var lines = result.Error.Trim().Split('\n');
        Assert.All(lines[..^1], l => Assert.StartsWith("waiting for cluster 'nowhere' via Redis", l));
        Assert.StartsWith($"error: cannot reach a cluster 'nowhere' through Redis 127.0.0.1:{redisPort}: cannot open a connection (Connection refused)", lines[^1]);
        Assert.Matches(@"\(tried for \d+ s\)$", lines[^1]);
    }

    [Theory]
    [InlineData("redis:6379", "redis", 6379)]
    [InlineData("localhost:7000", "localhost", 7000)]
    [InlineData("backprop-redis.backprop.svc.cluster.local:6380", "backprop-redis.backprop.svc.cluster.local", 6380)]
    [InlineData("10.0.0.7:6379", "10.0.0.7", 6379)]
    [InlineData("[::1]:6379", "::1", 6379)]
    [InlineData("6379", "127.0.0.1", 6379)]
    public void A_redis_address_keeps_its_host_name(string text, string host, int port) =>
        Assert.Equal((host, port), RedisConnection.ParseEndpoint(text, "--redis"));

    [Theory]
    [InlineData("redis:0")]
    [InlineData("redis:x")]
    [InlineData("red is:6379")]
    [InlineData("::1:6379")]
    public void A_bad_redis_address_is_refused_naming_the_option(string text) =>
        Assert.StartsWith("--redis: ", Assert.Throws<ArgumentException>(() => RedisConnection.ParseEndpoint(text, "--redis")).Message);
}
