using System.Diagnostics;
using System.Numerics;
using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using ScottPlot;

namespace Backprop.Bench;

/// <summary>
/// `bench complexity`: the seed's analysis, measured. It derives O(B · Σ nₗnₗ₊₁) time per step, so a constant
/// time per sample and epoch for a given network, and O(Σ nₗnₗ₊₁ + B · Σ nₗ) memory. Each point trains
/// <see cref="LocalTrainer"/> (the product's step: one chunk of B samples, momentum) on generated 28×28 data
/// for a few short repeats and scales the time per sample to an epoch of 60,000; the bytes are what
/// constructing the trainer allocates (parameters, optimizer state, gradient sum, every thread's backprop
/// buffers). The prediction's constants are fitted on the mid range (widths 128–512, batches 32–256), so the
/// table and the plot show where the measurement leaves the line, not the constant itself.
/// </summary>
public static class ComplexityBench
{
    public const string Usage = """
        usage: Backprop.Bench complexity [--quick] [--json] [--threads 1,N] [--out FILE.png]
          Sweeps hidden widths 32-2048 and depths 1-4 at batch 64, and batch sizes 1-1024 at two widths of depth 2,
          on Core (LocalTrainer, generated data), and compares s/epoch (60,000 samples) and allocated bytes with the
          seed's O(B·Σ nₗnₗ₊₁) time and O(Σ nₗnₗ₊₁ + B·Σ nₗ) memory, constants fitted on the mid range.
          --quick           fewer points and shorter repeats: about half a minute instead of about three
          --json            one JSON line per point instead of the markdown table
          --threads LIST    backprop threads per point, comma-separated [default: 1 and the core count]
          --out FILE.png    also write the log-log plot (time against Σ nₗnₗ₊₁ and against B; bytes against prediction)
        """;

    private const int EpochSamples = 60_000;

    private sealed record Point(string Sweep, int Width, int Depth, int Batch, int Threads)
    {
        public int[] Layers => [784, .. Enumerable.Repeat(Width, Depth), 10];
        /// <summary>Σ nₗnₗ₊₁: multiply-adds of one sample's forward pass, the seed's time term.</summary>
        public long Weights => Layers.Zip(Layers[1..], (a, b) => (long)a * b).Sum();
        /// <summary>Σ nₗ: the units whose activations and deltas a sample keeps, the seed's memory term per sample.</summary>
        public long Units => Layers.Sum(n => (long)n);
        /// <summary>The memory term of the batch: every backprop thread holds its own activations and deltas.</summary>
        public long BatchUnits => (long)Threads * Batch * Units;
        public bool MidRange => Width is >= 128 and <= 512 && Batch is >= 32 and <= 256;
    }

    private sealed record Measured(Point Point, long Parameters, double BestSecondsPerSample, double MedianSecondsPerSample,
        int StepsPerRepeat, int Repeats, long BufferBytes, long VectorBytes, long AllocatedBytes, double AllocatedBytesPerStep);

    public static int Run(string[] args)
    {
        if (!BenchArgs.TryParse(args, "complexity", Usage, Parse, out var parsed, out int exitCode)) return exitCode;
        var (quick, json, outPath, threads) = parsed;

        var points = Sweep(quick, threads);
        // Short repeats on a loaded machine: the best of several is the machine's speed, the median what a run sees.
        int repeats = quick ? 5 : 9;
        double repeatSeconds = quick ? 0.03 : 0.06;
        string load = LoadAverage();
        Console.Error.WriteLine($"complexity: {points.Count} points, {repeats} repeats of ~{repeatSeconds * 1e3:F0} ms each; {Environment.ProcessorCount} cores; "
            + $"vector width {Vector<float>.Count * 32} bits ({Gemm.Best}); {Caches()}; load average {load}");

        var train = SyntheticDigits.Create(EpochSamples, 1, seed: 1).Train;
        WarmUp(train);
        var results = new List<Measured>();
        var clock = Stopwatch.StartNew();
        foreach (var point in points)
        {
            var m = Measure(point, train, repeats, repeatSeconds);
            results.Add(m);
            Console.Error.WriteLine($"  [{results.Count}/{points.Count}] {string.Join('-', point.Layers)} B={point.Batch} {point.Threads}t: "
                + $"{m.BestSecondsPerSample * EpochSamples:F3} s/epoch best, {m.MedianSecondsPerSample * EpochSamples:F3} median ({clock.Elapsed.TotalSeconds:F0} s)");
        }
        string loadAfter = LoadAverage();

        var secondsPerWeight = threads.ToDictionary(t => t, t => Median(results.Where(r => r.Point.Threads == t && r.Point.MidRange)
            .Select(r => r.BestSecondsPerSample / r.Point.Weights)));
        var (bytesPerWeight, bytesPerUnit) = FitBytes(results.Where(r => r.Point.MidRange).ToList());
        double PredictedEpoch(Measured r) => secondsPerWeight[r.Point.Threads] * r.Point.Weights * EpochSamples;
        double PredictedBytes(Measured r) => bytesPerWeight * r.Point.Weights + bytesPerUnit * r.Point.BatchUnits;

        if (json)
        {
            foreach (var r in results)
                Console.WriteLine(JsonSerializer.Serialize(new
                {
                    sweep = r.Point.Sweep,
                    layers = string.Join('-', r.Point.Layers),
                    width = r.Point.Width,
                    depth = r.Point.Depth,
                    batchSize = r.Point.Batch,
                    threads = r.Point.Threads,
                    weights = r.Point.Weights,
                    units = r.Point.Units,
                    parameters = r.Parameters,
                    repeats = r.Repeats,
                    samplesPerRepeat = (long)r.StepsPerRepeat * r.Point.Batch,
                    secondsPerEpochBest = r.BestSecondsPerSample * EpochSamples,
                    secondsPerEpochMedian = r.MedianSecondsPerSample * EpochSamples,
                    secondsPerEpochPredicted = PredictedEpoch(r),
                    gflopsBest = Flops(r.Point.Layers) / r.BestSecondsPerSample / 1e9,
                    bufferBytes = r.BufferBytes,
                    vectorBytes = r.VectorBytes,
                    allocatedBytes = r.AllocatedBytes,
                    bytesPredicted = PredictedBytes(r),
                    allocatedBytesPerStep = r.AllocatedBytesPerStep,
                    vectorWidthBits = Vector<float>.Count * 32,
                    loadAverage = load,
                }));
        }
        else
        {
            Console.WriteLine($"Vector width {Vector<float>.Count * 32} bits, {Environment.ProcessorCount} cores, {Caches()}; load average {load} before, {loadAfter} after; "
                + $"{clock.Elapsed.TotalSeconds:F0} s. Fitted on the mid range (widths 128–512, batches 32–256): "
                + string.Join(", ", secondsPerWeight.Select(p => $"{p.Value * 1e12:F1} ps per weight and sample on {p.Key} thread(s) ({2 * 3 / p.Value / 1e9:F0} GFLOP/s)"))
                + $"; {bytesPerWeight:F2} bytes per weight + {bytesPerUnit:F2} bytes per unit, sample and thread.");
            Console.WriteLine();
            Console.WriteLine("| sweep | layers | B | threads | Σ nₗnₗ₊₁ | s/epoch best | median | predicted | best/pred. | GFLOP/s | BatchBackprop buffers | vectors | allocated | predicted | alloc./pred. | B/step |");
            Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            foreach (var r in results)
            {
                double best = r.BestSecondsPerSample * EpochSamples, predicted = PredictedEpoch(r);
                Console.WriteLine($"| {r.Point.Sweep} | {string.Join('-', r.Point.Layers)} | {r.Point.Batch} | {r.Point.Threads} | {r.Point.Weights:N0} | {best:F3} | "
                    + $"{r.MedianSecondsPerSample * EpochSamples:F3} | {predicted:F3} | {best / predicted:F2} | {Flops(r.Point.Layers) / r.BestSecondsPerSample / 1e9:F1} | "
                    + $"{ResourceLimits.Bytes(r.BufferBytes)} | {ResourceLimits.Bytes(r.VectorBytes)} | {ResourceLimits.Bytes(r.AllocatedBytes)} | "
                    + $"{ResourceLimits.Bytes((long)PredictedBytes(r))} | {r.AllocatedBytes / PredictedBytes(r):F2} | {r.AllocatedBytesPerStep:F0} |");
            }
        }
        if (outPath is not null)
        {
            WritePlot(results, secondsPerWeight, PredictedBytes, outPath, $"{Vector<float>.Count * 32}-bit vectors, load {load.Split(' ')[0]}");
            Console.Error.WriteLine($"plot: {outPath}");
        }
        return 0;
    }

    private static (bool Quick, bool Json, string? Out, int[] Threads) Parse(string[] args)
    {
        bool quick = false, json = false;
        string? outPath = null;
        int[] threads = [1, Environment.ProcessorCount];
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--quick": quick = true; break;
                case "--json": json = true; break;
                case "--out" when i + 1 < args.Length: outPath = args[++i]; break;
                case "--threads" when i + 1 < args.Length:
                    threads = args[++i].Split(',').Select(t => int.TryParse(t, out int n) && n is >= 1 and <= ResourceLimits.MaxThreadsPerWorker ? n
                        : throw new ArgumentException($"--threads: '{t}' is not a thread count in 1..{ResourceLimits.MaxThreadsPerWorker}")).ToArray();
                    break;
                default:
                    throw new ArgumentException(args[i] is "--out" or "--threads" ? $"{args[i]}: needs a value" : $"unknown argument '{args[i]}'");
            }
        }
        if (outPath is not null && !outPath.EndsWith(".png", StringComparison.OrdinalIgnoreCase))
            throw new ArgumentException($"--out: '{outPath}' is not a .png file");
        return (quick, json, outPath, threads.Distinct().ToArray());
    }

    /// <summary>Widths × depths at batch 64 (the time term), and batch sizes at a narrow and a wide net (the per-step costs).</summary>
    private static List<Point> Sweep(bool quick, int[] threads)
    {
        int[] widths = quick ? [32, 128, 512, 2048] : [32, 64, 128, 256, 512, 1024, 2048];
        int[] depths = quick ? [1, 2, 4] : [1, 2, 3, 4];
        int[] batches = quick ? [1, 4, 16, 64, 256, 1024] : [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
        int[] batchWidths = quick ? [256] : [128, 1024];
        var points = new List<Point>();
        foreach (int t in threads)
        {
            foreach (int depth in depths)
                foreach (int width in widths)
                    points.Add(new Point("width", width, depth, 64, t));
            foreach (int width in batchWidths)
                foreach (int batch in batches)
                    points.Add(new Point("batch", width, 2, batch, t));
        }
        return points;
    }

    /// <summary>Trains until the JIT has nothing left to compile: its background thread would otherwise take a core during the first points.</summary>
    private static void WarmUp(Dataset train)
    {
        using var trainer = new LocalTrainer(Spec(new Point("warm-up", 64, 2, 16, 1)), train);
        for (int epoch = 0; epoch < 20; epoch++)
        {
            long compiled = System.Runtime.JitInfo.GetCompiledMethodCount();
            trainer.TrainEpoch(epoch, maxSteps: 500);
            if (epoch > 0 && System.Runtime.JitInfo.GetCompiledMethodCount() == compiled) break;
        }
    }

    private static RunSpec Spec(Point p) => Presets.PyTorchMlp with
    {
        Model = Presets.PyTorchMlp.Model with { Layers = p.Layers },
        BatchSize = p.Batch,
        ChunkSize = p.Batch,
        Workers = 1,
        TrainLimit = 0,
    };

    private static Measured Measure(Point point, Dataset train, int repeats, double repeatSeconds)
    {
        var spec = Spec(point);
        // The training thread allocates everything the trainer holds, row threads' buffers included.
        long before = GC.GetAllocatedBytesForCurrentThread();
        using var trainer = new LocalTrainer(spec, train, point.Threads);
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        int epoch = 0, stepsPerEpoch = (EpochSamples + point.Batch - 1) / point.Batch;

        // Warm-up: one step touches every buffer; a quarter repeat after it sizes the repeats.
        trainer.TrainEpoch(epoch++, maxSteps: 1);
        long start = Stopwatch.GetTimestamp();
        trainer.TrainEpoch(epoch++, maxSteps: 1);
        double secondsPerStep = Stopwatch.GetElapsedTime(start).TotalSeconds;
        int warmSteps = (int)Math.Clamp(Math.Ceiling(repeatSeconds / 4 / secondsPerStep), 1, stepsPerEpoch);
        start = Stopwatch.GetTimestamp();
        trainer.TrainEpoch(epoch++, maxSteps: warmSteps);
        secondsPerStep = Stopwatch.GetElapsedTime(start).TotalSeconds / warmSteps;
        int steps = (int)Math.Clamp(Math.Ceiling(repeatSeconds / secondsPerStep), 1, stepsPerEpoch);

        var perSample = new List<double>();
        long allocatedInSteps = 0;
        for (int r = 0; r < repeats; r++)
        {
            long allocatedBefore = GC.GetAllocatedBytesForCurrentThread();
            long t0 = Stopwatch.GetTimestamp();
            trainer.TrainEpoch(epoch++, maxSteps: steps);
            double seconds = Stopwatch.GetElapsedTime(t0).TotalSeconds;
            allocatedInSteps += GC.GetAllocatedBytesForCurrentThread() - allocatedBefore;
            perSample.Add(seconds / ((long)steps * point.Batch));
        }
        long parameters = spec.Model.ParameterCount;
        int stateVectors = Optimizer.For(spec.Optimizer).StateVectors;
        // Parameters, optimizer state and the step's gradient sum.
        long vectorBytes = (2 + stateVectors) * parameters * sizeof(float);
        return new Measured(point, parameters, perSample.Min(), Median(perSample), steps, repeats,
            BatchBackprop.BufferBytes(spec.Model, spec.ChunkSize, point.Threads), vectorBytes, allocated, (double)allocatedInSteps / (repeats * steps));
    }

    /// <summary>
    /// bytes ≈ a · Σ nₗnₗ₊₁ + b · threads · B · Σ nₗ, least squares on the relative error over <paramref name="mid"/>
    /// (absolute errors would let the largest points decide alone).
    /// </summary>
    private static (double PerWeight, double PerUnit) FitBytes(List<Measured> mid)
    {
        double uu = 0, uv = 0, vv = 0, u1 = 0, v1 = 0;
        foreach (var r in mid)
        {
            double u = r.Point.Weights / (double)r.AllocatedBytes, v = r.Point.BatchUnits / (double)r.AllocatedBytes;
            (uu, uv, vv, u1, v1) = (uu + u * u, uv + u * v, vv + v * v, u1 + u, v1 + v);
        }
        double det = uu * vv - uv * uv;
        return ((u1 * vv - v1 * uv) / det, (v1 * uu - u1 * uv) / det);
    }

    /// <summary>Multiply-add = 2 FLOP: forward and weight gradients of every layer, input gradients of all but the first (as `core` counts).</summary>
    private static double Flops(int[] layers) =>
        2 * Enumerable.Range(0, layers.Length - 1).Sum(l => (double)layers[l] * layers[l + 1] * (l > 0 ? 3 : 2));

    private static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToList();
        return sorted.Count == 0 ? double.NaN : sorted.Count % 2 == 1 ? sorted[sorted.Count / 2] : (sorted[sorted.Count / 2 - 1] + sorted[sorted.Count / 2]) / 2;
    }

    private static string LoadAverage() =>
        File.Exists("/proc/loadavg") ? string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3)) : "unknown";

    /// <summary>The data caches of the first core as Linux reports them, e.g. "L1d 32K, L2 1024K, L3 32768K".</summary>
    private static string Caches()
    {
        var dir = new DirectoryInfo("/sys/devices/system/cpu/cpu0/cache");
        if (!dir.Exists) return "caches unknown";
        var caches = dir.GetDirectories("index*")
            .Select(d => (Level: Read(d, "level"), Type: Read(d, "type"), Size: Read(d, "size")))
            .Where(c => c.Type != "Instruction")
            .OrderBy(c => c.Level)
            .Select(c => $"L{c.Level}{(c.Type == "Data" ? "d" : "")} {c.Size}");
        return string.Join(", ", caches);

        static string Read(DirectoryInfo d, string name) => File.Exists(Path.Combine(d.FullName, name)) ? File.ReadAllText(Path.Combine(d.FullName, name)).Trim() : "?";
    }

    private static void WritePlot(List<Measured> results, Dictionary<int, double> secondsPerWeight, Func<Measured, double> predictedBytes, string path, string machine)
    {
        var multiplot = new ScottPlot.Multiplot();
        multiplot.AddPlots(3);
        multiplot.Layout = new ScottPlot.MultiplotLayouts.Columns();
        var colors = new ScottPlot.Palettes.Category10();

        var widthPlot = multiplot.GetPlot(0);
        int c = 0;
        foreach (var group in results.Where(r => r.Point.Sweep == "width").GroupBy(r => r.Point.Threads))
        {
            var color = colors.GetColor(c++);
            var measured = widthPlot.Add.ScatterPoints(group.Select(r => Math.Log10(r.Point.Weights)).ToArray(),
                group.Select(r => Math.Log10(r.BestSecondsPerSample * EpochSamples)).ToArray(), color);
            measured.LegendText = $"measured, {group.Key} thread(s)";
            double lo = group.Min(r => r.Point.Weights), hi = group.Max(r => r.Point.Weights);
            var line = widthPlot.Add.Line(Math.Log10(lo), Math.Log10(secondsPerWeight[group.Key] * lo * EpochSamples),
                Math.Log10(hi), Math.Log10(secondsPerWeight[group.Key] * hi * EpochSamples));
            line.Color = color;
            line.LinePattern = ScottPlot.LinePattern.Dashed;
            line.LegendText = $"c·Σ nₗnₗ₊₁, {group.Key} thread(s)";
        }
        Axes(widthPlot, "Σ nₗnₗ₊₁ (weights), depths 1–4, widths 32–2048", "s per epoch (60,000 samples)", $"Time at batch 64; {machine}");

        var batchPlot = multiplot.GetPlot(1);
        c = 0;
        foreach (var group in results.Where(r => r.Point.Sweep == "batch").GroupBy(r => (r.Point.Width, r.Point.Threads)))
        {
            var color = colors.GetColor(c++);
            var measured = batchPlot.Add.Scatter(group.Select(r => Math.Log10(r.Point.Batch)).ToArray(),
                group.Select(r => Math.Log10(r.BestSecondsPerSample * EpochSamples)).ToArray(), color);
            measured.LegendText = $"784-{group.Key.Width}-{group.Key.Width}-10, {group.Key.Threads} thread(s)";
            double predicted = Math.Log10(secondsPerWeight[group.Key.Threads] * group.First().Point.Weights * EpochSamples);
            var line = batchPlot.Add.Line(0, predicted, Math.Log10(group.Max(r => r.Point.Batch)), predicted);
            line.Color = color;
            line.LinePattern = ScottPlot.LinePattern.Dashed;
        }
        Axes(batchPlot, "batch size B (dashed: prediction, flat in B)", "s per epoch (60,000 samples)", "Time against batch size, depth 2");

        var bytesPlot = multiplot.GetPlot(2);
        c = 0;
        foreach (var group in results.GroupBy(r => r.Point.Sweep))
        {
            var measured = bytesPlot.Add.ScatterPoints(group.Select(r => Math.Log10(predictedBytes(r))).ToArray(),
                group.Select(r => Math.Log10(r.AllocatedBytes)).ToArray(), colors.GetColor(c++));
            measured.LegendText = $"{group.Key} sweep";
        }
        double min = results.Min(r => Math.Min(predictedBytes(r), r.AllocatedBytes)), max = results.Max(r => Math.Max(predictedBytes(r), r.AllocatedBytes));
        var identity = bytesPlot.Add.Line(Math.Log10(min), Math.Log10(min), Math.Log10(max), Math.Log10(max));
        identity.Color = ScottPlot.Colors.Gray;
        identity.LinePattern = ScottPlot.LinePattern.Dashed;
        identity.LegendText = "measured = predicted";
        Axes(bytesPlot, "predicted a·Σ nₗnₗ₊₁ + b·threads·B·Σ nₗ (bytes)", "allocated by the trainer (bytes)", "Memory");

        multiplot.SavePng(path, 1800, 560);
    }

    /// <summary>Log-log axes: the data are log10 values, the ticks show the numbers.</summary>
    private static void Axes(ScottPlot.Plot plot, string x, string y, string title)
    {
        foreach (var axis in new ScottPlot.IAxis[] { plot.Axes.Bottom, plot.Axes.Left })
            axis.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic
            {
                MinorTickGenerator = new ScottPlot.TickGenerators.LogMinorTickGenerator(),
                IntegerTicksOnly = true,
                LabelFormatter = v => Math.Abs(v) >= 3 ? $"1e{v:0}" : Math.Pow(10, v).ToString("0.###", System.Globalization.CultureInfo.InvariantCulture),
            };
        plot.Axes.Bottom.Label.Text = x;
        plot.Axes.Left.Label.Text = y;
        plot.Title(title);
        plot.ShowLegend(ScottPlot.Alignment.UpperLeft);
    }
}
