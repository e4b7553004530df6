using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// Two real silo processes started by deploy/local/cluster.sh, and the CLI run against them as a user would.
/// Uses the builds of this test run (the same configuration) and generated MNIST-shaped data.
/// </summary>
[Collection("cluster")]
public sealed class LocalClusterTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("e2e-").FullName;
    private string State => Path.Combine(_work, "state");
    private string DataDir => Path.Combine(_work, "data");

    public void Dispose()
    {
        Script("stop");
        Directory.Delete(_work, recursive: true);
    }

    [Fact]
    public void Cli_trains_on_two_silo_processes_and_matches_a_single_process_bit_for_bit()
    {
        // 30 steps an epoch: the profile's allocation count is a mean over them, and a process' background work
        // (membership, the CLI's status calls) lands in it too.
        var data = SyntheticDigits.Create(trainCount: 1920, testCount: 200, seed: 9);
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), data);
        var taken = new HashSet<int>();
        int siloPort = Processes.FreePorts(2, taken), gatewayPort = Processes.FreePorts(2, taken);
        string cluster = "e2e-" + Guid.NewGuid().ToString("N")[..8];

        var started = Script("start", "--silos", "2", "--silo-port", siloPort.ToString(), "--gateway-port", gatewayPort.ToString(),
            "--cluster-id", cluster, "--data-dir", DataDir);
        Assert.True(started.Code == 0, started.Output);
        Assert.Contains("silo-1 up", started.Output);

        string metrics = Path.Combine(_work, "metrics.jsonl"), model = Path.Combine(_work, "model.bpm");
        var train = Cli("train", "--preset", "pytorch-mlp", "--epochs", "2", "--workers", "4", "--seed", "4",
            "--gateway", $"127.0.0.1:{gatewayPort}", "--cluster-id", cluster, "--run-id", "e2e-run",
            "--metrics-out", metrics, "--model-out", model);
        Assert.True(train.Code == 0, train.Output);
        Assert.Contains("run e2e-run on cluster", train.Output);

        var lines = File.ReadAllLines(metrics).Select(l => JsonDocument.Parse(l).RootElement).ToArray();
        Assert.Equal([1, 2], lines.Select(l => l.GetProperty("epoch").GetInt32()));
        foreach (var key in new[] { "trainLoss", "testLoss", "seconds", "samplesPerSecond" })
            Assert.True(lines[1].GetProperty(key).GetDouble() > 0, key);
        double accuracy = lines[1].GetProperty("testAccuracy").GetDouble();
        Assert.InRange(accuracy, 0.0, 1.0);

        // Four workers with a chunk each, two per silo, a shard on each silo: each worker pushes the other process' half
        // of its sum and gets that half of the next version back (no pulls once the first step is done), in pooled buffers.
        var profile = lines[1].GetProperty("profile");
        long vectorBytes = Presets.PyTorchMlp.Model.ParameterCount * sizeof(float);
        Assert.Equal(4.0 * vectorBytes, profile.GetProperty("wireBytesPerStep").GetDouble());
        // A step that allocated the vectors it receives would allocate at least two (parameters in one process,
        // a sum in the other); Orleans' own messages are tens of KB.
        double allocated = profile.GetProperty("allocatedBytesPerStep").GetDouble();
        Assert.InRange(allocated, 1, vectorBytes);

        var local = new LocalTrainer(Presets.PyTorchMlp with { Seed = 4, Workers = 4, Epochs = 2 }, data.Train);
        local.TrainEpoch(0);
        local.TrainEpoch(1);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), lines[1].GetProperty("parameterSha256").GetString());

        // One worker and seven shards across the two processes: the same bits as one process too.
        string sevenMetrics = Path.Combine(_work, "seven.jsonl");
        var seven = Cli("train", "--preset", "pytorch-mlp", "--epochs", "1", "--workers", "1", "--server-shards", "7", "--seed", "4",
            "--gateway", $"127.0.0.1:{gatewayPort}", "--cluster-id", cluster, "--run-id", "e2e-seven", "--metrics-out", sevenMetrics);
        Assert.True(seven.Code == 0, seven.Output);
        var one = new LocalTrainer(Presets.PyTorchMlp with { Seed = 4, Workers = 1, Epochs = 1, ServerShards = 7 }, data.Train);
        one.TrainEpoch(0);
        var sevenLine = JsonDocument.Parse(File.ReadAllLines(sevenMetrics).Single()).RootElement;
        Assert.Equal(ParameterHash.Sha256(one.Parameters), sevenLine.GetProperty("parameterSha256").GetString());
        Assert.True(sevenLine.GetProperty("profile").GetProperty("wireBytesPerStep").GetDouble() > 0, "no shard in the other process");

        var status = Cli("status", "e2e-run", "--gateway", $"127.0.0.1:{gatewayPort}", "--cluster-id", cluster);
        Assert.True(status.Code == 0, status.Output);
        Assert.Contains("run e2e-run: completed", status.Output);
        Assert.Contains("workers on 2 silo(s)", status.Output);

        var unknown = Cli("status", "no-such-run", "--gateway", $"127.0.0.1:{gatewayPort}", "--cluster-id", cluster);
        Assert.Equal(2, unknown.Code);
        Assert.StartsWith("error: no run 'no-such-run'", unknown.Error.Trim());

        var watch = Cli("watch", "e2e-run", "--gateway", $"127.0.0.1:{gatewayPort}", "--cluster-id", cluster);
        Assert.True(watch.Code == 0, watch.Output);
        Assert.Contains($"{accuracy * 100:F2}%", watch.Output);

        // The run's curves from its epochs in the cluster, as from its metrics file.
        string curves = Path.Combine(_work, "curves.png");
        var plot = Cli("plot", "e2e-run", "--gateway", $"127.0.0.1:{gatewayPort}", "--cluster-id", cluster, "--out", curves);
        Assert.True(plot.Code == 0, plot.Output);
        using (var png = SkiaSharp.SKBitmap.Decode(curves)) Assert.Equal((Backprop.Client.Figures.CurvesWidth, Backprop.Client.Figures.CurvesHeight), (png.Width, png.Height));

        var eval = Cli("eval", "--model", model, "--data-dir", DataDir);
        Assert.True(eval.Code == 0, eval.Output);
        Assert.Contains($"test accuracy {accuracy * 100:F2}%", eval.Output);
    }

    [Fact]
    public void Damaged_data_and_nonsense_flags_exit_2_with_one_line()
    {
        var dir = DatasetCatalog.DirectoryOf(DataDir, "mnist");
        IdxWriter.WriteDataset(dir, SyntheticDigits.Create(50, 20, seed: 1));
        var images = Path.Combine(dir, DatasetCatalog.TrainImages);
        File.WriteAllBytes(images, File.ReadAllBytes(images).AsSpan(0, 1000).ToArray());

        var damaged = Cli("train", "--epochs", "1", "--data-dir", DataDir);
        Assert.Equal(2, damaged.Code);
        var line = Assert.Single(damaged.Error.Trim().Split('\n'));
        Assert.Contains("train-images-idx3-ubyte: truncated", line);

        var nonsense = Cli("train", "--batch-size", "many");
        Assert.Equal(2, nonsense.Code);
        Assert.Equal("error: --batch-size: 'many' is not an integer (see --help)", nonsense.Error.Trim());

        var badValue = Cli("train", "--workers", "0", "--data-dir", DataDir);
        Assert.Equal(2, badValue.Code);
        Assert.Equal("error: workers: 0 is outside 1..256", badValue.Error.Trim());

        // Passed every check once, then its int buffer sizes wrapped and the kernels wrote past them.
        var huge = Cli("train", "--layers", "784,65536,10", "--batch-size", "32768", "--chunk-size", "32768",
            "--workers", "1", "--epochs", "1", "--data-dir", DataDir);
        Assert.Equal(2, huge.Code);
        Assert.StartsWith("error: layers: [784,65536,10] has 52101130 parameters", Assert.Single(huge.Error.Trim().Split('\n')));

        // Environment variables are option defaults: a bad one is a bad flag (one line, exit 2), for the CLI and the silo.
        var badEnv = Processes.CliWithEnv(new() { ["BACKPROP_CONNECT_TIMEOUT"] = "abc" }, "status", "some-run", "--gateway", "127.0.0.1:1");
        Assert.Equal(2, badEnv.Code);
        Assert.Equal("error: BACKPROP_CONNECT_TIMEOUT='abc' (for --connect-timeout) is not an integer", badEnv.Error.Trim());
        var badSiloEnv = Processes.Run("dotnet", [Path.Combine(Processes.Root, "src/Silo/bin", Processes.Configuration, "net10.0/Backprop.Silo.dll")],
            new() { ["BACKPROP_REDIS_TLS"] = "maybe" });
        Assert.Equal(2, badSiloEnv.Code);
        Assert.Equal("error: BACKPROP_REDIS_TLS='maybe' (for --redis-tls) is not true or false", badSiloEnv.Error.Trim());

        // Port 1: nothing listens there, and no ephemeral port can be it (a client could connect to itself).
        var noCluster = Cli("status", "some-run", "--gateway", "127.0.0.1:1");
        Assert.Equal(1, noCluster.Code);
        Assert.StartsWith("error: cannot reach a cluster", Assert.Single(noCluster.Error.Trim().Split('\n')));
    }

    private static Processes.Result Cli(params string[] args) => Processes.Cli(args);

    private Processes.Result Script(params string[] args) => Processes.Script(State, args);
}
