using System.Text.Json;
using Backprop.Grains.Messages;

namespace Backprop.Client;

/// <summary>One finished epoch, as the learning curves show it.</summary>
public sealed record EpochPoint(int Epoch, double TrainLoss, double TestLoss, double TestAccuracy, double SamplesPerSecond)
{
    public static EpochPoint Of(EpochResult e) => new(e.Epoch, e.TrainLoss, e.TestLoss, e.TestAccuracy, e.SamplesPerSecond);
}

/// <summary>One run's epochs in order, and the name its curves carry in the legend.</summary>
public sealed record RunCurves(string Label, IReadOnlyList<EpochPoint> Epochs);

/// <summary>Reads the JSON lines that --metrics-out writes (<see cref="RunReporter.MetricsLine"/>).</summary>
public static class MetricsFile
{
    /// <summary>
    /// The runs in <paramref name="path"/>, in the order they first appear, each labelled with its runId (the file's
    /// name for lines without one): a file appended to by several runs, or by train and then resume, holds them all.
    /// Throws <see cref="ArgumentException"/> naming the file (and the 1-based line) when it is missing, a line is not
    /// a metrics object, or it holds no epoch.
    /// </summary>
    public static IReadOnlyList<RunCurves> Read(string path)
    {
        if (!File.Exists(path)) throw new ArgumentException($"{path}: no such file");
        var runs = new List<(string Label, List<EpochPoint> Epochs)>();
        int number = 0;
        foreach (string line in File.ReadLines(path))
        {
            number++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            var (runId, point) = Parse(line, $"{path}:{number}");
            string label = runId ?? Path.GetFileName(path);
            int at = runs.FindIndex(r => r.Label == label);
            if (at < 0) runs.Add((label, [point]));
            else runs[at].Epochs.Add(point);
        }
        if (runs.Count == 0) throw new ArgumentException($"{path}: no epochs");
        return [.. runs.Select(r => new RunCurves(r.Label, [.. r.Epochs.OrderBy(e => e.Epoch)]))];
    }

    private static (string? RunId, EpochPoint Point) Parse(string line, string where)
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(line);
        }
        catch (JsonException e)
        {
            throw new ArgumentException($"{where}: not valid JSON ({e.Message.Split('\n', 2)[0].Trim()})");
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new ArgumentException($"{where}: not a JSON object");
            string? runId = root.TryGetProperty("runId", out var id) && id.ValueKind == JsonValueKind.String ? id.GetString() : null;
            double epoch = Number(root, "epoch", where);
            if (epoch < 1 || epoch != Math.Floor(epoch) || epoch > int.MaxValue) throw new ArgumentException($"{where}: epoch {epoch} is not a positive integer");
            return (runId, new EpochPoint((int)epoch, Number(root, "trainLoss", where), Number(root, "testLoss", where),
                Number(root, "testAccuracy", where), Number(root, "samplesPerSecond", where)));
        }
    }

    private static double Number(JsonElement root, string name, string where) =>
        root.TryGetProperty(name, out var value) && value.ValueKind == JsonValueKind.Number
            ? value.GetDouble()
            : throw new ArgumentException($"{where}: no number '{name}'");
}
