using System.Diagnostics;
using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;
using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>The CLI's embedded cluster as a user meets it: Ctrl+C and resume, and a diverging run.</summary>
[Collection("cluster")]
public sealed class EmbeddedRunTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("embedded-").FullName;
    private string DataDir => Path.Combine(_work, "data");
    private readonly TrainTest _data = SyntheticDigits.Create(trainCount: 640, testCount: 200, seed: 12);

    public EmbeddedRunTests() => IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), _data);

    public void Dispose() => Directory.Delete(_work, recursive: true);

    [Fact]
    public void A_run_interrupted_by_ctrl_c_resumes_from_its_checkpoint_with_the_same_bits()
    {
        const int epochs = 60;
        string metrics = Path.Combine(_work, "metrics.jsonl");
        var train = CliProcess.Start("train", "--epochs", $"{epochs}", "--seed", "11", "--workers", "2", "--run-id", "interrupted",
            "--checkpoint-every", "3", "--data-dir", DataDir, "--metrics-out", metrics);
        // Ctrl+C once the first epoch is reported: the run is then well inside its 600 steps.
        train.WaitForLine(line => line.TrimStart().StartsWith("1 "), TimeSpan.FromSeconds(60));
        train.Interrupt();
        var stopped = train.Finish(TimeSpan.FromSeconds(60));
        Assert.True(stopped.Code == 130, stopped.Output);
        Assert.Contains("continue it with: resume interrupted", stopped.Error);
        int before = File.ReadAllLines(metrics).Length;
        Assert.InRange(before, 1, epochs - 1);

        var runs = Cli("runs", "--data-dir", DataDir);
        Assert.True(runs.Code == 0, runs.Output);
        Assert.Matches($@"interrupted\s+cancelled\s+{before}/60", runs.Output);

        // Resumed from the stored progress, not from the start; the metrics file gets only the epochs it adds.
        var resumed = Cli("resume", "interrupted", "--data-dir", DataDir, "--metrics-out", metrics);
        Assert.True(resumed.Code == 0, resumed.Output);
        Assert.Contains($"run interrupted resumed on embedded cluster (1 silo in this process) ({before} of 60 epochs done)", resumed.Output);
        var lines = File.ReadAllLines(metrics).Select(l => JsonDocument.Parse(l).RootElement).ToArray();
        Assert.Equal(Enumerable.Range(1, epochs), lines.Select(l => l.GetProperty("epoch").GetInt32()));

        using var local = new LocalTrainer(Presets.PyTorchMlp with { Seed = 11, Workers = 2, Epochs = epochs }, _data.Train);
        for (int e = 0; e < epochs; e++) local.TrainEpoch(e);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), lines[^1].GetProperty("parameterSha256").GetString());

        var again = Cli("resume", "interrupted", "--data-dir", DataDir);
        Assert.Equal(0, again.Code);
        Assert.Contains("run interrupted is already completed (60 of 60 epochs)", again.Output);
    }

    [Fact]
    public void A_run_that_one_cli_process_is_running_is_refused_to_a_second_until_the_first_has_ended()
    {
        // Far more epochs than the test lasts: the first process runs until it is interrupted.
        var first = CliProcess.Start("train", "--epochs", "100000", "--seed", "4", "--workers", "2", "--run-id", "busy", "--data-dir", DataDir, "--no-progress");
        try
        {
            first.WaitForLine(line => line.TrimStart().StartsWith("1 "), TimeSpan.FromSeconds(60));
            var resume = Cli("resume", "busy", "--data-dir", DataDir);
            Assert.True(resume.Code == 1, resume.Output + resume.Error);
            Assert.Contains("run 'busy' is being run by another backprop process on this machine", resume.Error);
            var train = Cli("train", "--epochs", "2", "--run-id", "busy", "--data-dir", DataDir);
            Assert.True(train.Code == 1, train.Output + train.Error);
            Assert.Contains("run 'busy' is being run by another backprop process", train.Error);
            // Another run of the same store is not held up.
            var other = Cli("train", "--epochs", "1", "--run-id", "other", "--data-dir", DataDir, "--no-progress");
            Assert.True(other.Code == 0, other.Output + other.Error);
        }
        finally
        {
            first.Interrupt();
            Assert.Equal(130, first.Finish(TimeSpan.FromSeconds(60)).Code);
        }
        // Ended (cancelled with a checkpoint): the run is free again, and a resume goes on with it.
        var status = Cli("runs", "--data-dir", DataDir);
        Assert.Matches(@"busy\s+cancelled", status.Output);
        var again = CliProcess.Start("resume", "busy", "--data-dir", DataDir, "--no-progress");
        try
        {
            again.WaitForLine(line => line.Contains("run busy resumed on embedded cluster"), TimeSpan.FromSeconds(60));
        }
        finally
        {
            again.Interrupt();
            Assert.Equal(130, again.Finish(TimeSpan.FromSeconds(60)).Code);
        }
    }

    [Fact]
    public void The_fast_98_preset_trains_to_the_same_bits_on_1_and_4_workers_as_a_single_process()
    {
        // Its recipe (AdamW, one-cycle, batch 128 in chunks of 32, shifted images) on generated digits, 2 epochs: what matters is that every worker
        // count gives the bits of LocalTrainer (the 98% is measured on MNIST in README).
        var hashes = new List<string>();
        foreach (int workers in new[] { 1, 4 })
        {
            string metrics = Path.Combine(_work, $"fast98-{workers}.jsonl");
            var run = Cli("train", "--preset", "fast-98", "--epochs", "2", "--workers", $"{workers}", "--run-id", $"fast98-{workers}",
                "--data-dir", DataDir, "--metrics-out", metrics, "--no-progress");
            Assert.True(run.Code == 0, run.Output);
            var last = JsonDocument.Parse(File.ReadAllLines(metrics)[^1]).RootElement;
            Assert.Equal(2, last.GetProperty("epoch").GetInt32());
            hashes.Add(last.GetProperty("parameterSha256").GetString()!);
        }
        using var local = new LocalTrainer(Presets.Fast98 with { Epochs = 2 }, _data.Train);
        for (int e = 0; e < 2; e++) local.TrainEpoch(e);
        Assert.Equal([ParameterHash.Sha256(local.Parameters), ParameterHash.Sha256(local.Parameters)], hashes);
    }

    [Fact]
    public void A_cluster_step_allocates_no_vectors_once_warm()
    {
        // Four workers with a chunk each, the server reducing their sums: every vector of a step (parameters,
        // chunk sums, the tree's partial sums, the optimizer's update) lives in buffers reused from step to step.
        // What is left is Orleans' messages and the few records a step sends (~20 KB), far under one parameter vector.
        string metrics = Path.Combine(_work, "alloc.jsonl");
        var run = Cli("train", "--epochs", "3", "--workers", "4", "--seed", "5", "--checkpoint-every", "1000",
            "--data-dir", DataDir, "--metrics-out", metrics);
        Assert.True(run.Code == 0, run.Output);
        long vectorBytes = Presets.PyTorchMlp.Model.ParameterCount * sizeof(float);
        foreach (var line in File.ReadAllLines(metrics).Skip(1).Select(l => JsonDocument.Parse(l).RootElement))
        {
            var profile = line.GetProperty("profile");
            Assert.Equal(10, profile.GetProperty("steps").GetInt32());
            // The workers go from step to step with the shards as the barrier: the coordinator calls them once for many
            // steps (each call is sized to ~200 ms of steps of ~1 ms here; one step a call would be 10).
            Assert.InRange(profile.GetProperty("workerCalls").GetInt32(), 1, 9);
            Assert.Equal(0, profile.GetProperty("wireBytesPerStep").GetDouble());
            Assert.InRange(profile.GetProperty("allocatedBytesPerStep").GetDouble(), 1, vectorBytes / 4.0);
        }
    }

    [Fact]
    public void A_huge_learning_rate_ends_as_diverged_with_exit_3()
    {
        var run = Cli("train", "--epochs", "1", "--lr", "1e30", "--run-id", "boom", "--data-dir", DataDir);
        Assert.Equal(3, run.Code);
        var line = Assert.Single(run.Error.Trim().Split('\n'));
        Assert.Matches(@"^run boom diverged: diverged at step \d+ \(epoch 1\): ", line);
    }
}
