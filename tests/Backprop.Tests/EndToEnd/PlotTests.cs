using Backprop.Client;
using Backprop.Core.Data;
using Backprop.Grains.Messages;
using SkiaSharp;
using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// `plot` and `eval --confusion-png` as a user runs them: the PNGs are decoded and looked at (size, not blank, the
/// runs' colours), and bad input gets one line and exit code 2.
/// </summary>
[Collection("cluster")]
public sealed class PlotTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("plot-").FullName;
    private string DataDir => Path.Combine(_work, "data");

    public void Dispose() => Directory.Delete(_work, recursive: true);

    // The legend's first two colours (ScottPlot's Category10): one per run, in the order given.
    private static readonly SKColor FirstRun = new(0x1f, 0x77, 0xb4), SecondRun = new(0xff, 0x7f, 0x0e);

    [Fact]
    public void A_trained_run_is_plotted_from_its_metrics_file_and_from_its_id_and_its_model_gets_a_confusion_heatmap()
    {
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), SyntheticDigits.Create(trainCount: 320, testCount: 100, seed: 5));
        string metrics = Path.Combine(_work, "metrics.jsonl"), model = Path.Combine(_work, "model.bin");
        var train = Cli("train", "--layers", "784,16,10", "--epochs", "3", "--batch-size", "32", "--workers", "2", "--threads-per-worker", "1",
            "--run-id", "curves", "--data-dir", DataDir, "--metrics-out", metrics, "--model-out", model, "--no-progress");
        Assert.True(train.Code == 0, train.Output);

        string one = Path.Combine(_work, "one.png");
        var plot = Cli("plot", metrics, "--out", one);
        Assert.True(plot.Code == 0, plot.Output);
        var image = Look(one);
        Assert.Equal((Figures.CurvesWidth, Figures.CurvesHeight), (image.Width, image.Height));
        Assert.True(image.Colours > 100, $"{image.Colours} distinct colours");
        Assert.True(image.Ink > 0.02, $"{image.Ink:P1} of the pixels differ from the background");
        Assert.True(image.Count(FirstRun) > 100, "the run's curves are drawn in the first colour");
        Assert.Equal(0, image.Count(SecondRun));

        // The same run again from its stored epochs (the embedded store under --data-dir): a second run in the figure.
        string two = Path.Combine(_work, "out", "two.png");
        plot = Cli("plot", metrics, "curves", "--data-dir", DataDir, "--out", two);
        Assert.True(plot.Code == 0, plot.Output);
        Assert.Contains($"2 runs drawn in {two}", plot.Output);
        image = Look(two);
        Assert.True(image.Count(FirstRun) > 100 && image.Count(SecondRun) > 100, "each run in its own colour");

        string confusion = Path.Combine(_work, "confusion.png");
        var eval = Cli("eval", "--model", model, "--data-dir", DataDir, "--confusion-png", confusion);
        Assert.True(eval.Code == 0, eval.Output);
        Assert.Contains($"confusion matrix drawn in {confusion}", eval.Output);
        image = Look(confusion);
        Assert.Equal((Figures.ConfusionSize, Figures.ConfusionSize), (image.Width, image.Height));
        Assert.True(image.Colours > 100, $"{image.Colours} distinct colours");
        Assert.True(image.Ink > 0.3, $"{image.Ink:P1} of the pixels differ from the background");
    }

    [Fact]
    public void Bad_input_is_one_line_and_exit_code_2()
    {
        string good = Path.Combine(_work, "good.jsonl"), bad = Path.Combine(_work, "bad.jsonl"), empty = Path.Combine(_work, "empty.jsonl"),
            partial = Path.Combine(_work, "partial.jsonl");
        string line = RunReporter.MetricsLine("r1", new EpochResult(1, 0.5, 0.4, 0.9, 1.0, 1000, "00", 10, []), lr: 0.01);
        File.WriteAllLines(good, [line]);
        File.WriteAllLines(bad, [line, "", "{\"epoch\": 2, \"trainLoss\": "]);
        File.WriteAllText(empty, "\n");
        File.WriteAllLines(partial, ["{\"epoch\": 1, \"trainLoss\": 1, \"testLoss\": 1}"]);
        string missing = Path.Combine(_work, "missing.jsonl"), png = Path.Combine(_work, "x.png");

        Fails($"{missing}: no such file", "plot", missing, "--out", png);
        Fails($"{bad}:3: not valid JSON", "plot", good, bad, "--out", png);
        Fails($"{empty}: no epochs", "plot", empty, "--out", png);
        Fails($"{partial}:1: no number 'testAccuracy'", "plot", partial, "--out", png);
        // A directory where the file's folder should be: nothing can be written there.
        Fails("--out: cannot write", "plot", good, "--out", Path.Combine(good, "x.png"));
        // A name that is no file but could be a run id, with no cluster given and no stored runs there.
        Fails("no-such-run: no such file; for a run, give --gateway or --redis", "plot", "no-such-run", "--data-dir", Path.Combine(_work, "nothing"), "--out", png);
        Fails("--out", "plot", good);
        Assert.False(File.Exists(png));
    }

    private static void Fails(string message, params string[] args)
    {
        var result = Cli(args);
        Assert.True(result.Code == 2, $"exit {result.Code}: {result.Output}");
        string error = result.Error.TrimEnd();
        Assert.DoesNotContain('\n', error);
        Assert.Contains(message, error);
    }

    private sealed record Png(int Width, int Height, int Colours, double Ink, Dictionary<SKColor, int> Pixels)
    {
        public int Count(SKColor colour) => Pixels.GetValueOrDefault(colour);
    }

    /// <summary>The decoded PNG: its size, how many distinct colours, and the share of pixels not of the background (the commonest colour).</summary>
    private static Png Look(string path)
    {
        using var bitmap = SKBitmap.Decode(path);
        Assert.NotNull(bitmap);
        var pixels = new Dictionary<SKColor, int>();
        foreach (var p in bitmap.Pixels) pixels[p.WithAlpha(255)] = pixels.GetValueOrDefault(p.WithAlpha(255)) + 1;
        double background = pixels.Values.Max();
        return new Png(bitmap.Width, bitmap.Height, pixels.Count, 1 - background / (bitmap.Width * bitmap.Height), pixels);
    }
}
