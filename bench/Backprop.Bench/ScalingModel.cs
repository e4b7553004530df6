using System.Text.Json;

namespace Backprop.Bench;

/// <summary>
/// `bench scaling --rows FILE`: a model of the sync step on N worker machines, fitted to the rows of
/// `bench cluster --json` (one file or several), printed as markdown tables for bench/README.md.
///
/// Per step, with V = parameter bytes, B the batch, N worker machines of one worker thread each, and every
/// step's chunks cut into N blocks (chunk size B/N, so that all N are busy):
///   compute   a · B/N                  a: a worker's compute per sample (embedded row, fastest worker)
///   reduce    r · (N + 4)              r: the server's fused pass per vector it touches (N sums, θ, v, θ', v')
///   wire      2 N V · c  +  N V · 8/BW c: CPU cost per byte moved between processes (serialize, copy, parse:
///                                         processes row minus embedded row, per wire byte); BW: the server's
///                                         link, full duplex, carries N vectors each way
///   fixed     o                        grain calls and the coordinator (embedded row: step − compute − reduce)
/// epoch = steps · (compute + reduce + wire + fixed); efficiency = epoch(1) / (N · epoch(N)).
/// The points measured here (1, 2, 3 processes on loopback, BW = ∞ as c already holds the loopback copies)
/// check it; every input comes from the embedded and processes rows with 2 workers of the same model and batch.
/// </summary>
public static class ScalingModel
{
    public const string Usage = """
        usage: Backprop.Bench scaling --rows FILE [--rows FILE ...] [--batch 256]
          Fits the step model to `cluster --json` rows (embedded and processes with 2 workers, per model and batch),
          checks it against every processes row (1, 2, 3 silos), and predicts 1..64 worker machines on 10, 25 and
          100 Gb/s links. Prints markdown.
               Backprop.Bench scaling --sharded --rows FILE [--rows FILE ...] [--plot FILE.png]
          The sharded design's model (ShardedScalingModel): checked against `cluster --hosts` rows, weak scaling predicted
          for 784-1024-1024-10 and 784-4096-4096-10 at 64 and 256 samples per worker; --plot writes the 25 Gb/s curves.
        """;

    private sealed record Row(string Mode, int Workers, int Batch, string Model, long Parameters, double StepUs,
        double SlowestUs, double FastestUs, double TransferUs, double ReduceUs, double WireBytes, double Seconds, int Steps);

    private sealed record Fit(double ComputePerSampleUs, double ReducePerVectorUs, double CpuPerByteUs, double FixedUs, long VectorBytes);

    public static int Run(string[] args)
    {
        var files = args.Select((a, i) => (a, i)).Where(p => p.a == "--rows" && p.i + 1 < args.Length).Select(p => args[p.i + 1]).ToList();
        if (files.Count == 0 || args.Contains("--help"))
        {
            Console.Error.WriteLine(Usage);
            return files.Count == 0 && !args.Contains("--help") ? 2 : 0;
        }
        if (args.Contains("--sharded")) return ShardedScalingModel.Run(files, args.SkipWhile(a => a != "--plot").Skip(1).FirstOrDefault());
        int batch = int.Parse(args.SkipWhile(a => a != "--batch").Skip(1).FirstOrDefault() ?? "256");
        var rows = files.SelectMany(File.ReadLines).Where(l => l.TrimStart().StartsWith('{')).Select(Parse).OfType<Row>().ToList();

        foreach (var group in rows.Where(r => r.Mode != "core").GroupBy(r => (r.Model, r.Batch)).OrderBy(g => g.Key.Model).ThenBy(g => g.Key.Batch))
        {
            var embedded = group.FirstOrDefault(r => r.Mode == "embedded" && r.Workers == 2);
            var processes = group.FirstOrDefault(r => r.Mode == "processes" && r.Workers == 2);
            if (embedded is null || processes is null) continue;
            var fit = FitFrom(embedded, processes);
            Console.WriteLine($"### {group.Key.Model}, batch {group.Key.Batch}");
            Console.WriteLine();
            Console.WriteLine($"Fitted: compute {fit.ComputePerSampleUs:F2} µs/sample, reduce {fit.ReducePerVectorUs:F1} µs per vector pass, " +
                $"{fit.CpuPerByteUs * 1e3:F3} µs/KB moved between processes, fixed {fit.FixedUs:F0} µs/step; V = {fit.VectorBytes / 1024.0:F0} KB.");
            Console.WriteLine();
            Console.WriteLine("| processes on loopback | measured µs/step | model µs/step | model/measured |");
            Console.WriteLine("|---|---|---|---|");
            foreach (var p in group.Where(r => r.Mode == "processes").OrderBy(r => r.Workers))
            {
                double model = StepUs(fit, p.Batch, p.Workers, bitsPerSecond: double.PositiveInfinity);
                Console.WriteLine($"| {p.Workers} | {p.StepUs:F0} | {model:F0} | {model / p.StepUs:F2} |");
            }
            Console.WriteLine();
        }

        // Predictions at one batch size, both models if their rows are there.
        foreach (var group in rows.GroupBy(r => r.Model).OrderBy(g => g.Key))
        {
            var embedded = group.FirstOrDefault(r => r.Mode == "embedded" && r.Workers == 2 && r.Batch == batch) ?? group.FirstOrDefault(r => r.Mode == "embedded" && r.Workers == 2);
            var processes = group.FirstOrDefault(r => r.Mode == "processes" && r.Workers == 2 && r.Batch == embedded?.Batch);
            if (embedded is null || processes is null) continue;
            var fit = FitFrom(embedded, processes);
            int b = embedded.Batch, steps = (60_000 + b - 1) / b;
            Console.WriteLine($"### Predicted: {group.Key}, batch {b}, 60,000 samples ({steps} steps), chunk size B/N");
            Console.WriteLine();
            Console.WriteLine("| worker machines | 10 Gb/s s/epoch | eff. | 25 Gb/s s/epoch | eff. | 100 Gb/s s/epoch | eff. |");
            Console.WriteLine("|---|---|---|---|---|---|---|");
            foreach (int n in new[] { 1, 2, 4, 8, 16, 32, 64 })
            {
                var cells = new[] { 10e9, 25e9, 100e9 }.Select(bw =>
                {
                    double one = StepUs(fit, b, 1, bw) * steps / 1e6, many = StepUs(fit, b, n, bw) * steps / 1e6;
                    return $"{many:F2} | {one / (n * many):P0}";
                });
                Console.WriteLine($"| {n} | {string.Join(" | ", cells)} |");
            }
            Console.WriteLine();
        }
        return 0;
    }

    private static Fit FitFrom(Row embedded, Row processes)
    {
        long vector = embedded.Parameters * sizeof(float);
        double perSample = embedded.FastestUs / (embedded.Batch / (double)embedded.Workers);
        double reduce = embedded.ReduceUs / (embedded.Workers + 4);
        double fixedUs = Math.Max(0, embedded.StepUs - embedded.SlowestUs - embedded.ReduceUs);
        double perByte = processes.WireBytes > 0 ? Math.Max(0, processes.TransferUs - embedded.TransferUs) / processes.WireBytes : 0;
        return new Fit(perSample, reduce, perByte, fixedUs, vector);
    }

    /// <summary>One step on n worker machines (a single machine: no wire), in µs.</summary>
    private static double StepUs(Fit f, int batch, int n, double bitsPerSecond)
    {
        double compute = f.ComputePerSampleUs * batch / n;
        double reduce = f.ReducePerVectorUs * (n + 4);
        double wire = n == 1 ? 0 : 2.0 * n * f.VectorBytes * f.CpuPerByteUs + (double.IsInfinity(bitsPerSecond) ? 0 : n * f.VectorBytes * 8 / bitsPerSecond * 1e6);
        return compute + reduce + wire + f.FixedUs;
    }

    private static Row? Parse(string line)
    {
        var r = JsonDocument.Parse(line).RootElement;
        if (!r.TryGetProperty("stepMicroseconds", out var step) || step.ValueKind != JsonValueKind.Object) return null;
        return new Row(r.GetProperty("mode").GetString()!, r.GetProperty("workers").GetInt32(), r.GetProperty("batchSize").GetInt32(),
            r.GetProperty("model").GetString()!, r.GetProperty("parameters").GetInt64(), r.GetProperty("microsecondsPerStep").GetDouble(),
            step.GetProperty("slowestCompute").GetDouble(), step.GetProperty("fastestCompute").GetDouble(), step.GetProperty("transfer").GetDouble(),
            step.GetProperty("reduceAndStep").GetDouble(), r.GetProperty("wireBytesPerStep").GetDouble(), r.GetProperty("secondsPerEpochMedian").GetDouble(),
            (int)Math.Round(r.GetProperty("samplesPerEpoch").GetDouble() / r.GetProperty("batchSize").GetInt32()));
    }
}
