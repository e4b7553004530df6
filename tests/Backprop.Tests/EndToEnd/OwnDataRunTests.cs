using System.Globalization;
using System.Text;
using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;
using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>`train --dataset PATH` on a folder of the user's, with a validation split and early stopping, on the CLI's embedded cluster.</summary>
[Collection("cluster")]
public sealed class OwnDataRunTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("own-data-run-").FullName;
    private string DataDir => Path.Combine(_work, "data");

    public void Dispose() => Directory.Delete(_work, recursive: true);

    /// <summary>A CSV folder of 3 learnable classes of 12 values (not a square: one row each), with Kaggle's header row.</summary>
    private string CsvFolder(int trainCount, int testCount)
    {
        var dir = Path.Combine(_work, "csv");
        Directory.CreateDirectory(dir);
        var random = new Random(7);
        foreach (var (file, count) in new[] { (DatasetCatalog.TrainCsv, trainCount), (DatasetCatalog.TestCsv, testCount) })
        {
            var text = new StringBuilder("label," + string.Join(',', Enumerable.Range(0, 12).Select(k => $"v{k}")) + "\n");
            for (int i = 0; i < count; i++)
            {
                int label = random.Next(3);
                var values = Enumerable.Range(0, 12).Select(k => k % 3 == label ? 200 + random.Next(56) : random.Next(120));
                text.Append(CultureInfo.InvariantCulture, $"{label},{string.Join(',', values)}\n");
            }
            File.WriteAllText(Path.Combine(dir, file), text.ToString());
        }
        return dir;
    }

    private static JsonElement[] Metrics(string path) => File.ReadAllLines(path).Select(l => JsonDocument.Parse(l).RootElement).ToArray();

    [Fact]
    public void A_csv_folder_trains_with_layers_fitted_to_its_values_and_classes_with_the_bits_of_the_local_trainer()
    {
        var dir = CsvFolder(trainCount: 120, testCount: 30);
        string metrics = Path.Combine(_work, "csv.jsonl");
        var run = Cli("train", "--dataset", dir, "--epochs", "3", "--workers", "2", "--batch-size", "16", "--seed", "3", "--lr", "0.1",
            "--data-dir", DataDir, "--metrics-out", metrics, "--no-progress");
        Assert.True(run.Code == 0, run.Output + run.Error);
        Assert.Contains("[12,128,64,3]", run.Output);
        Assert.Contains($"dataset {dir}", run.Output);

        var data = DatasetCatalog.LoadOwn(dir);
        var spec = Presets.PyTorchMlp with
        {
            BatchSize = 16, ChunkSize = 4, Epochs = 3, Workers = 2, Seed = 3, Dataset = dir, Optimizer = Presets.PyTorchMlp.Optimizer with { LearningRate = 0.1 },
        };
        spec = spec.FittedTo(data.Train);
        using var local = new LocalTrainer(spec, data.Train);
        for (int e = 0; e < 3; e++) local.TrainEpoch(e);
        var lines = Metrics(metrics);
        Assert.Equal(3, lines.Length);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), lines[^1].GetProperty("parameterSha256").GetString());
        Assert.Equal(JsonValueKind.Null, lines[^1].GetProperty("validationAccuracy").ValueKind);
        // Learnable: far above a third.
        Assert.True(lines[^1].GetProperty("testAccuracy").GetDouble() > 0.8, run.Output);
    }

    [Fact]
    public void An_idx_folder_with_a_validation_split_stops_early_and_keeps_its_best_epoch()
    {
        var data = SyntheticDigits.Create(trainCount: 300, testCount: 60, seed: 21, noise: 0.6, side: 6, classes: 4);
        var dir = Path.Combine(_work, "idx");
        IdxWriter.WriteDataset(dir, data);
        string metrics = Path.Combine(_work, "idx.jsonl"), model = Path.Combine(_work, "best.model");
        const int epochs = 40, patience = 2, validation = 100;
        var run = Cli("train", "--dataset", dir, "--epochs", $"{epochs}", "--workers", "3", "--batch-size", "20", "--seed", "2", "--lr", "0.02",
            "--validation", $"{validation}", "--early-stop", $"{patience}", "--keep", "best", "--model-out", model,
            "--data-dir", DataDir, "--metrics-out", metrics, "--no-progress");
        Assert.True(run.Code == 0, run.Output + run.Error);
        Assert.Contains("val acc", run.Output);

        // The same run in one process: validation figures epoch by epoch, and where the rule stops it.
        var spec = Presets.PyTorchMlp with
        {
            BatchSize = 20, ChunkSize = 5, Epochs = epochs, Workers = 3, Seed = 2, Dataset = dir, Validation = validation, EarlyStop = patience, KeepBest = true,
            Optimizer = Presets.PyTorchMlp.Optimizer with { LearningRate = 0.02 },
        };
        var loaded = DatasetCatalog.LoadOwn(dir);
        spec = spec.FittedTo(loaded.Train);
        using var local = new LocalTrainer(spec, loaded.Train);
        var expected = new List<(double Loss, double Accuracy, string Sha)>();
        int best = 0;
        for (int e = 0; e < epochs && expected.Count - 1 - best < patience; e++)
        {
            local.TrainEpoch(e);
            var v = local.EvaluateValidation();
            expected.Add((v.MeanLoss, v.Accuracy, ParameterHash.Sha256(local.Parameters)));
            if (v.Accuracy > expected[best].Accuracy) best = expected.Count - 1;
        }
        Assert.True(expected.Count < epochs, "the synthetic data should stop early");

        var lines = Metrics(metrics);
        Assert.Equal(expected.Count, lines.Length);
        for (int e = 0; e < lines.Length; e++)
        {
            Assert.Equal(expected[e].Loss, lines[e].GetProperty("validationLoss").GetDouble());
            Assert.Equal(expected[e].Accuracy, lines[e].GetProperty("validationAccuracy").GetDouble());
            Assert.Equal(expected[e].Sha, lines[e].GetProperty("parameterSha256").GetString());
        }
        Assert.Contains($"early stop: validation accuracy has not improved for {patience} epochs", run.Output);
        Assert.Contains($"(epoch {best + 1}, the best by validation accuracy)", run.Output);
        var saved = ModelFile.Load(model);
        Assert.Equal(expected[best].Sha, ParameterHash.Sha256(saved.Parameters));
        Assert.Equal($"{best + 1}", saved.Info["epochs"]);
    }

    [Fact]
    public void Shifted_training_images_give_the_bits_of_the_local_trainer()
    {
        var data = SyntheticDigits.Create(trainCount: 160, testCount: 40, seed: 5, side: 8, classes: 3);
        var dir = Path.Combine(_work, "shift");
        IdxWriter.WriteDataset(dir, data);
        string metrics = Path.Combine(_work, "shift.jsonl");
        var run = Cli("train", "--dataset", dir, "--epochs", "3", "--workers", "3", "--batch-size", "32", "--seed", "4", "--augment", "shift2",
            "--data-dir", DataDir, "--metrics-out", metrics, "--no-progress");
        Assert.True(run.Code == 0, run.Output + run.Error);
        Assert.Contains("augment shift2", run.Output);

        var loaded = DatasetCatalog.LoadOwn(dir);
        var spec = (Presets.PyTorchMlp with { BatchSize = 32, ChunkSize = 8, Epochs = 3, Workers = 3, Seed = 4, Dataset = dir, Augment = RunSpec.Shift2 }).FittedTo(loaded.Train);
        using var shifted = new LocalTrainer(spec, loaded.Train);
        using var plain = new LocalTrainer(spec with { Augment = RunSpec.NoAugment }, loaded.Train);
        for (int e = 0; e < 3; e++)
        {
            shifted.TrainEpoch(e);
            plain.TrainEpoch(e);
        }
        Assert.Equal(ParameterHash.Sha256(shifted.Parameters), Metrics(metrics)[^1].GetProperty("parameterSha256").GetString());
        Assert.NotEqual(ParameterHash.Sha256(plain.Parameters), ParameterHash.Sha256(shifted.Parameters));
    }

    [Fact]
    public void Bad_data_and_bad_validation_settings_are_one_line_usage_errors()
    {
        var dir = Path.Combine(_work, "ragged");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, DatasetCatalog.TrainCsv), "label,a,b\n0,1,2\n1,2,3\n2,3\n");
        File.WriteAllText(Path.Combine(dir, DatasetCatalog.TestCsv), "0,1,2\n");
        var cases = new (string[] Args, string Message)[]
        {
            (["--dataset", dir], $"error: {Path.Combine(dir, "train.csv")}: line 4: 1 values, but line 2 has 2"),
            (["--dataset", Path.Combine(_work, "nowhere")], $"error: {Path.Combine(_work, "nowhere")}: no such folder"),
            (["--dataset", CsvFolder(20, 5), "--validation", "20"], "error: validation: 20 held-out images leave none of the 20 training images"),
            (["--early-stop", "2"], "error: early-stop: needs --validation"),
            (["--validation", "10", "--early-stop", "-1"], "error: early-stop: patience -1 is negative"),
            (["--validation", "-5"], "error: validation: -5 is negative"),
            (["--keep", "best"], "error: keep: best needs --validation"),
            (["--dataset", CsvFolder(20, 5), "--augment", "shift2"], "error: augment: shift2 needs images of at least 3x3 pixels"),
            (["--keep", "worst"], "error: Argument 'worst' not recognized."),
        };
        foreach (var (args, message) in cases)
        {
            var result = Cli(["train", "--epochs", "1", "--data-dir", DataDir, "--no-progress", .. args]);
            Assert.True(result.Code == 2, $"{string.Join(' ', args)}: {result.Output}{result.Error}");
            Assert.StartsWith(message, result.Error.Trim());
            Assert.Single(result.Error.Trim().Split('\n'));
        }
    }
}
