using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>The optimizer, schedule and clipping flags as a user gives them: the run they make, its rates in the metrics, and one-line errors.</summary>
[Collection("cluster")]
public sealed class OptimizerCliTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("optimizer-cli-").FullName;
    private string DataDir => Path.Combine(_work, "data");
    // 640 images at batch 64: 10 steps an epoch.
    private readonly TrainTest _data = SyntheticDigits.Create(trainCount: 640, testCount: 200, seed: 13);

    public OptimizerCliTests() => IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), _data);

    public void Dispose() => Directory.Delete(_work, recursive: true);

    [Fact]
    public void An_adamw_run_with_a_cosine_schedule_reports_each_epochs_rate_and_has_the_bits_of_a_single_process()
    {
        string metrics = Path.Combine(_work, "metrics.jsonl");
        var run = Cli("train", "--optimizer", "adamw", "--lr", "0.002", "--weight-decay", "0.01", "--lr-schedule", "cosine", "--warmup-steps", "3",
            "--epochs", "2", "--workers", "2", "--seed", "4", "--data-dir", DataDir, "--metrics-out", metrics);
        Assert.True(run.Code == 0, run.Output + run.Error);
        Assert.Contains("adamw lr 0.002 betas 0.9/0.999 eps 1E-08 weight decay 0.01, cosine to 0, warm-up 3 steps", run.Output);
        var lines = File.ReadAllLines(metrics).Select(l => JsonDocument.Parse(l).RootElement).ToArray();
        // Epoch 1 starts in the warm-up (1/3 of the rate); epoch 2 at step 10, 7/16 of the way down the cosine from step 3 to step 19.
        const double lr = 0.002;
        Assert.Equal(lr / 3, lines[0].GetProperty("lr").GetDouble(), 15);
        Assert.Equal(lr * (1 + Math.Cos(Math.PI * 7 / 16)) / 2, lines[1].GetProperty("lr").GetDouble(), 15);

        var spec = Presets.PyTorchMlp with
        {
            Epochs = 2, Workers = 2, Seed = 4,
            Optimizer = new OptimizerSettings(OptimizerKind.AdamW, 0.002, 0.9f, WeightDecay: 0.01, Schedule: ScheduleKind.Cosine, WarmupSteps: 3),
        };
        using var local = new LocalTrainer(spec, _data.Train);
        local.TrainEpoch(0);
        local.TrainEpoch(1);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), lines[1].GetProperty("parameterSha256").GetString());
    }

    [Theory]
    [InlineData("beta1: 1 is outside [0, 1)", "--optimizer", "adam", "--beta1", "1")]
    [InlineData("eps: 0 is not a positive finite number", "--optimizer", "adam", "--eps", "0")]
    [InlineData("lr: 1E+39 is outside the range a float holds (1.4E-45 .. 3.4E+38)", "--lr", "1e39")]
    [InlineData("lr: 1E-46 is outside the range a float holds (1.4E-45 .. 3.4E+38)", "--lr", "1e-46")]
    [InlineData("weight-decay: -0.1 is not a non-negative finite number", "--weight-decay", "-0.1")]
    [InlineData("lr-step-epochs: 2 is not below the run's 2 epochs", "--lr-step-epochs", "2", "--epochs", "2")]
    [InlineData("warmup-steps: 20 is not below the run's 20 steps (2 epochs of 10)", "--warmup-steps", "20", "--epochs", "2")]
    public void Bad_optimizer_and_schedule_flags_get_a_one_line_error_and_exit_2(string message, params string[] flags)
    {
        var run = Cli(["train", .. flags, "--data-dir", DataDir]);
        Assert.True(run.Code == 2, run.Output + run.Error);
        Assert.Contains(message, Assert.Single(run.Error.Trim().Split('\n')));
    }

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
