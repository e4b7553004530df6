using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>`train --clip-norm` as a user gives it: the run it makes on the embedded silo, sharded, and its one-line errors.</summary>
[Collection("cluster")]
public sealed class ClipNormCliTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("clip-cli-").FullName;
    private string DataDir => Path.Combine(_work, "data");
    // 640 images at batch 64: 10 steps an epoch.
    private readonly TrainTest _data = SyntheticDigits.Create(trainCount: 640, testCount: 200, seed: 17);

    public ClipNormCliTests() => IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), _data);

    public void Dispose() => Directory.Delete(_work, recursive: true);

    [Fact]
    public void A_clipped_run_on_three_shards_has_the_bits_of_a_single_process_and_differs_from_the_unclipped_one()
    {
        string metrics = Path.Combine(_work, "metrics.jsonl");
        var run = Cli("train", "--clip-norm", "0.05", "--server-shards", "3", "--epochs", "2", "--workers", "2", "--seed", "4",
            "--data-dir", DataDir, "--metrics-out", metrics);
        Assert.True(run.Code == 0, run.Output + run.Error);
        Assert.Contains("clip-norm 0.05", run.Output);
        string sha = JsonDocument.Parse(File.ReadAllLines(metrics)[^1]).RootElement.GetProperty("parameterSha256").GetString()!;

        var spec = Presets.PyTorchMlp with { Epochs = 2, Workers = 2, Seed = 4, ServerShards = 3, ClipNorm = 0.05 };
        string Local(RunSpec s)
        {
            using var local = new LocalTrainer(s, _data.Train);
            local.TrainEpoch(0);
            local.TrainEpoch(1);
            return ParameterHash.Sha256(local.Parameters);
        }
        Assert.Equal(Local(spec), sha);
        Assert.NotEqual(Local(spec with { ClipNorm = 0 }), sha);
    }

    [Theory]
    [InlineData("clip-norm: -1 is not a non-negative finite number", "--clip-norm", "-1")]
    [InlineData("clip-norm: NaN is not a non-negative finite number", "--clip-norm", "NaN")]
    [InlineData("server-shards: 200 shards of 109386 parameters leave shard", "--clip-norm", "1", "--server-shards", "200")]
    public void Bad_clip_flags_get_a_one_line_error_and_exit_2(string message, params string[] flags)
    {
        var run = Cli(["train", .. flags, "--data-dir", DataDir]);
        Assert.True(run.Code == 2, run.Output + run.Error);
        Assert.Contains(message, Assert.Single(run.Error.Trim().Split('\n')));
    }
}
