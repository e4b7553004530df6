using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;
using Backprop.Tests.Infrastructure;
using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// Two real silo processes clustered through a real redis-server, both started by deploy/local/cluster.sh:
/// training through a list of gateways, finding the gateways through Redis, a silo killed and restarted,
/// and a finished run found again after the whole cluster (Redis included) was stopped and started; Redis requires
/// a password (AUTH) that silos and the CLI read from a file and never print.
/// </summary>
[Collection("cluster")]
public sealed class RedisClusterTests() : ClusterWorkspace("e2e-redis-")
{
    [Fact]
    public void Runs_live_in_redis_through_kill_restart_and_a_cluster_restart()
    {
        var data = SyntheticDigits.Create(trainCount: 320, testCount: 100, seed: 11);
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), data);
        var taken = new HashSet<int>();
        int siloPort = FreePorts(2, taken), gatewayPort = FreePorts(2, taken), redisPort = FreePorts(1, taken);
        string cluster = "e2e-" + Guid.NewGuid().ToString("N")[..8], redis = $"127.0.0.1:{redisPort}";
        string[] start = ["start", "--silos", "2", "--redis", "--redis-port", redisPort.ToString(), "--silo-port", siloPort.ToString(),
            "--gateway-port", gatewayPort.ToString(), "--cluster-id", cluster, "--data-dir", DataDir];

        var started = Script(State, start);
        Assert.True(started.Code == 0, started.Output);
        Assert.Contains("redis up", started.Output);
        Assert.Contains("silo-1 up", started.Output);
        Assert.Contains($"GATEWAYS=127.0.0.1:{gatewayPort},127.0.0.1:{gatewayPort + 1}", File.ReadAllText(Path.Combine(State, "cluster.env")));
        // Redis requires AUTH; silos and the CLI are told where the password is, not what it is.
        string passwordFile = Path.Combine(State, "redis.password");
        string password = File.ReadAllText(passwordFile).Trim();
        Assert.True(password.Length >= 32, password.Length.ToString());
        Assert.Contains($"BACKPROP_REDIS_PASSWORD_FILE={passwordFile}", File.ReadAllText(Path.Combine(State, "cluster.env")));
        if (!OperatingSystem.IsWindows()) Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(passwordFile));

        string metrics = Path.Combine(Work, "metrics.jsonl");
        var train = Cli("train", "--preset", "pytorch-mlp", "--epochs", "1", "--workers", "2", "--seed", "3",
            "--gateway", $"127.0.0.1:{gatewayPort},127.0.0.1:{gatewayPort + 1}", "--cluster-id", cluster, "--run-id", "redis-run",
            "--metrics-out", metrics);
        Assert.True(train.Code == 0, train.Output);
        var line = JsonDocument.Parse(File.ReadAllLines(metrics).Single()).RootElement;
        var local = new LocalTrainer(Presets.PyTorchMlp with { Seed = 3, Workers = 2, Epochs = 1 }, data.Train);
        local.TrainEpoch(0);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), line.GetProperty("parameterSha256").GetString());

        // No gateway named: the client reads the live gateways from Redis' membership table.
        var status = Cli("status", "redis-run", "--redis", redis, "--redis-password-file", passwordFile, "--cluster-id", cluster);
        Assert.True(status.Code == 0, status.Output);
        Assert.Contains("run redis-run: completed", status.Output);
        // Without TLS every silo opens its data lane on its own address.
        Assert.Contains("Data lane listening on 127.0.0.1:", File.ReadAllText(Path.Combine(State, "silo-0.log")));
        var noPassword = Cli("status", "redis-run", "--redis", redis, "--cluster-id", cluster);
        Assert.Equal(1, noPassword.Code);
        Assert.StartsWith($"error: cannot reach a cluster '{cluster}' through Redis {redis}: ", Assert.Single(noPassword.Error.Trim().Split('\n')));
        Assert.Contains("if Redis requires a password: --redis-password-file or BACKPROP_REDIS_PASSWORD", noPassword.Error);

        var killed = Script(State, "kill", "1");
        Assert.True(killed.Code == 0, killed.Output);
        Assert.Contains("silo-1 pid", Script(State, "status").Output);
        Assert.Contains("not running", Script(State, "status").Output);
        var restarted = Script(State, "restart", "1");
        Assert.True(restarted.Code == 0, restarted.Output);
        Assert.Contains("silo-1 up", restarted.Output);
        Assert.DoesNotContain("not running", Script(State, "status").Output);
        Assert.Equal(2, File.ReadAllLines(Path.Combine(State, "silo-1.log")).Count(l => l.Contains("silo-1 up")));

        // The whole cluster goes, Redis last (it writes its append-only file); the run comes back with it.
        var stopped = Script(State, "stop");
        Assert.True(stopped.Code == 0, stopped.Output);
        var again = Script(State, start);
        Assert.True(again.Code == 0, again.Output);
        // The same password again (kept in the state folder, like Redis' data), from the environment this time.
        var after = CliWithEnv(new() { ["BACKPROP_REDIS_PASSWORD"] = password }, "status", "redis-run", "--redis", redis, "--cluster-id", cluster);
        Assert.True(after.Code == 0, after.Output);
        Assert.Contains("run redis-run: completed", after.Output);
        // Never printed, nor on a command line (the silos' environment names the file).
        foreach (var file in Directory.GetFiles(State).Where(f => f != passwordFile))
            Assert.DoesNotContain(password, File.ReadAllText(file));
    }

    [Fact]
    public void A_silo_joins_a_redis_that_requires_a_password_with_it_and_fails_in_one_line_without_it_or_with_a_wrong_one()
    {
        string password = Guid.NewGuid().ToString("N");
        using var redis = new RedisServer(password);
        // A silo loads its data set before it joins.
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), SyntheticDigits.Create(trainCount: 100, testCount: 20, seed: 2));
        var taken = new HashSet<int>();
        string cluster = "e2e-" + Guid.NewGuid().ToString("N")[..8];
        string[] silo = ["--redis", redis.Address, "--cluster-id", cluster, "--silo-port", FreePorts(1, taken).ToString(),
            "--gateway-port", FreePorts(1, taken).ToString(), "--data-dir", DataDir];
        Directory.CreateDirectory(Work);
        string wrongFile = Path.Combine(Work, "wrong.password"), rightFile = Path.Combine(Work, "redis.password");
        File.WriteAllText(wrongFile, "not-the-password\n");
        File.WriteAllText(rightFile, password + "\n");

        var without = SiloHost(silo);
        Assert.True(without.Code == 1, without.Output);
        var error = Assert.Single(without.Error.Trim().Split('\n'));
        Assert.StartsWith($"error: cannot connect to Redis {redis.Address} (no password given): ", error);
        Assert.Contains("authentication", error);

        var wrong = SiloHost([.. silo, "--redis-password-file", wrongFile]);
        Assert.True(wrong.Code == 1, wrong.Output);
        error = Assert.Single(wrong.Error.Trim().Split('\n'));
        Assert.StartsWith($"error: cannot connect to Redis {redis.Address} (password from {wrongFile}): ", error);
        Assert.DoesNotContain("not-the-password", wrong.Output);

        var missing = SiloHost([.. silo, "--redis-password-file", Path.Combine(Work, "none")]);
        Assert.Equal(2, missing.Code);
        Assert.Equal($"error: --redis-password-file: {Path.Combine(Work, "none")}: no such file", Assert.Single(missing.Output.Trim().Split('\n')));

        // With the password (a file named by the environment, as cluster.sh and Kubernetes give it) the silo joins
        // and a client finds it through the same Redis.
        var joined = CliProcess.StartSilo(new() { ["BACKPROP_REDIS_PASSWORD_FILE"] = rightFile }, silo);
        try
        {
            joined.WaitForLine(l => l.Contains(" up: role all"), TimeSpan.FromSeconds(60));
            var runs = Cli("runs", "--redis", redis.Address, "--redis-password-file", rightFile, "--cluster-id", cluster);
            Assert.True(runs.Code == 0, runs.Output);
            Assert.Contains($"no runs in cluster '{cluster}'", runs.Output);
        }
        finally
        {
            joined.Interrupt();
            var stopped = joined.Finish(TimeSpan.FromSeconds(60));
            Assert.DoesNotContain(password, stopped.Output);
        }
    }

    [Fact]
    public void A_redis_without_the_cluster_and_no_redis_at_all_are_one_line_errors()
    {
        using var redis = new RedisServer();
        var empty = Cli("status", "some-run", "--redis", redis.Address, "--cluster-id", "no-such-cluster");
        Assert.Equal(1, empty.Code);
        Assert.StartsWith("error: cannot reach a cluster 'no-such-cluster' through Redis", Assert.Single(empty.Error.Trim().Split('\n')));
        Assert.Equal("", empty.Output.Replace(empty.Error, "").Trim());

        // Port 1: nothing listens there.
        var none = Cli("status", "some-run", "--redis", "127.0.0.1:1");
        Assert.Equal(1, none.Code);
        Assert.StartsWith("error: cannot reach a cluster", Assert.Single(none.Error.Trim().Split('\n')));
    }
}
