using System.Diagnostics;
using System.Text.Json;
using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using Backprop.Bench;

// Benchmarks, not tests: numbers for the README, measured as medians with a baseline from the same run.
//   dotnet run -c Release --project bench/Backprop.Bench -- core [--json] [--epochs N] [--threads 1,2] [--config a|b] [--data-dir DIR]
//   dotnet run -c Release --project bench/Backprop.Bench -- cluster --help   (core vs embedded cluster vs silo processes)
//   dotnet run -c Release --project bench/Backprop.Bench -- scaling --rows FILE (a step model fitted to cluster rows)
//   dotnet run -c Release --project bench/Backprop.Bench -- wire [--json]   (payload codec GB/s, raw TCP loopback floor)
//   dotnet run -c Release --project bench/Backprop.Bench -- soak --help   (Redis cluster for minutes, silos killed: flat? same bits?)
//   dotnet run -c Release --project bench/Backprop.Bench -- complexity --help   (the seed's time and memory complexity, measured)

if (args.Length > 0 && args[0] == "gemm") return GemmBench.Run();
if (args.Length > 0 && args[0] == "cluster") return await ClusterBench.Run(args[1..]);
if (args.Length > 0 && args[0] == "scaling") return ScalingModel.Run(args[1..]);
if (args.Length > 0 && args[0] == "wire") return await WireBench.Run(args[1..]);
if (args.Length > 0 && args[0] == "soak") return await SoakBench.Run(args[1..]);
if (args.Length > 0 && args[0] == "complexity") return ComplexityBench.Run(args[1..]);
if (args.Length == 0 || args[0] is "-h" or "--help" || args[0] != "core")
{
    Console.Error.WriteLine("usage: Backprop.Bench core [--json] [--epochs N (default 5)] [--threads 1,2] [--config a|b] [--data-dir DIR]");
    Console.Error.WriteLine("       Backprop.Bench cluster --help | scaling --help | wire --help | soak --help | complexity --help | gemm");
    return args.Length == 0 || args[0] is "-h" or "--help" ? 0 : 2;
}

bool json = args.Contains("--json");
int epochs = int.Parse(Arg("--epochs") ?? "5");
int[] threads = (Arg("--threads") ?? "1,2").Split(',').Select(int.Parse).ToArray();
string[] configs = (Arg("--config") ?? "a,b").Split(',');
string dataDir = Arg("--data-dir") ?? DatasetCatalog.DefaultDataDir();

var mnistDir = DatasetCatalog.DirectoryOf(dataDir, "mnist");
TrainTest data;
string dataName;
if (DatasetCatalog.IsPresent(mnistDir))
{
    data = DatasetCatalog.Load(mnistDir, "mnist");
    dataName = "mnist";
}
else
{
    data = SyntheticDigits.Create(60_000, 10_000, seed: 1);
    dataName = "synthetic (MNIST absent)";
}
if (args.Contains("--phases")) return PhaseBench.Run(data.Train);
if (!json) Console.Error.WriteLine($"data: {dataName}; {Environment.ProcessorCount} cores; {System.Runtime.InteropServices.RuntimeInformation.OSArchitecture}; Vector512 {System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated}");

foreach (var config in configs)
{
    var spec = config switch
    {
        "a" => Presets.PyTorchMlp with { ChunkSize = 64 },
        "b" => Presets.Nielsen with { ChunkSize = 10 },
        _ => throw new ArgumentException($"--config: unknown '{config}' (a or b)"),
    };
    double reference = ReferenceSecondsPerEpoch(spec, data.Train);
    foreach (int t in threads)
    {
        var result = Measure(spec, t, data.Train, epochs);
        var row = new
        {
            config = config == "a" ? "a: 784-128-64-10 relu/ce/momentum b64 60k" : "b: 784-30-10 sigmoid/quadratic/sgd b10 50k",
            threads = t,
            batchSize = spec.BatchSize,
            chunkSize = spec.ChunkSize,
            data = dataName,
            epochs,
            secondsPerEpochMedian = result.Median,
            secondsPerEpochMin = result.Min,
            secondsPerEpoch = result.Epochs.Select(e => Math.Round(e, 4)),
            coreToCoreRoundTripNs = result.CoreToCoreNs?.Select(ns => Math.Round(ns)),
            samplesPerSecond = result.Samples / result.Median,
            gflopsEffective = FlopsPerSample(spec.Model) * result.Samples / result.Median / 1e9,
            allocatedBytesPerStep = result.AllocatedPerStep,
            referenceSecondsPerEpoch = reference,
            speedupOverReference = reference / result.Median,
        };
        Console.WriteLine(json
            ? JsonSerializer.Serialize(row)
            : $"{row.config}, {t} thread(s): {row.secondsPerEpochMedian:F3} s/epoch median (min {row.secondsPerEpochMin:F3}), {row.samplesPerSecond:F0} samples/s, {row.gflopsEffective:F1} GFLOP/s, {row.allocatedBytesPerStep:F1} B/step allocated; reference {reference:F1} s/epoch ({row.speedupOverReference:F0}x)"
              + (result.CoreToCoreNs is { } c2c ? $"; core-to-core round trip {c2c[0]:F0}/{c2c[1]:F0} ns before/after" : ""));
    }
}
return 0;

string? Arg(string name)
{
    int i = Array.IndexOf(args, name);
    return i >= 0 && i + 1 < args.Length ? args[i + 1] : null;
}

static (double Median, double Min, List<double> Epochs, int Samples, double AllocatedPerStep, double[]? CoreToCoreNs) Measure(RunSpec spec, int threads, Dataset train, int epochs)
{
    using var trainer = new LocalTrainer(spec with { }, train, threads);
    int samples = spec.TrainCount(train.Count);
    int steps = (samples + spec.BatchSize - 1) / spec.BatchSize;
    // Warm-up until the JIT has nothing left to compile: its background thread would otherwise take one
    // of the two cores in slices of milliseconds, and every such slice stalls a lock-step 2-thread step.
    for (int warm = 0; warm < 10; warm++)
    {
        long compiled = System.Runtime.JitInfo.GetCompiledMethodCount();
        trainer.TrainEpoch(0);
        if (warm > 0 && System.Runtime.JitInfo.GetCompiledMethodCount() == compiled) break;
    }
    double? roundTripBefore = threads > 1 ? CoreToCore.RoundTripNanoseconds() : null;
    var seconds = new List<double>();
    long allocated = 0;
    for (int e = 1; e <= epochs; e++)
    {
        // The training thread's allocations: process-wide counts also see the runtime's own background work.
        long before = GC.GetAllocatedBytesForCurrentThread();
        long start = Stopwatch.GetTimestamp();
        trainer.TrainEpoch(e);
        long end = Stopwatch.GetTimestamp();
        allocated += GC.GetAllocatedBytesForCurrentThread() - before;
        seconds.Add((end - start) / (double)Stopwatch.Frequency);
    }
    double? roundTripAfter = threads > 1 ? CoreToCore.RoundTripNanoseconds() : null;
    var sorted = seconds.Order().ToList();
    return (sorted[sorted.Count / 2], sorted[0], seconds, samples, (double)allocated / (epochs * steps), roundTripBefore is { } b ? [b, roundTripAfter!.Value] : null);
}

// The per-sample MathNet reference on a subset, scaled to a full epoch (it is far too slow to run whole).
static double ReferenceSecondsPerEpoch(RunSpec spec, Dataset train)
{
    int subset = spec.Model.Layers[1] > 64 ? 200 : 1000;
    var p = Initializer.Create(spec.Model, spec.Init, spec.Seed).Select(v => (double)v).ToArray();
    var samples = Enumerable.Range(0, subset).Select(i =>
    {
        var x = new float[train.Features];
        train.CopyInputs([i], x);
        return (x, (int)train.Labels[i]);
    }).ToList();
    ReferenceBackprop.GradientSum(spec.Model, p, samples.Take(10).ToList());
    var clock = Stopwatch.StartNew();
    for (int s = 0; s < subset; s += spec.BatchSize)
        ReferenceBackprop.GradientSum(spec.Model, p, samples.Skip(s).Take(spec.BatchSize).ToList());
    return clock.Elapsed.TotalSeconds / subset * spec.TrainCount(train.Count);
}

// Multiply-add = 2 FLOP: forward and weight gradients of every layer, input gradients of all but the first.
static double FlopsPerSample(ModelSpec model)
{
    double macs = 0;
    for (int l = 0; l < model.LayerCount; l++)
    {
        double layer = (double)model.Layers[l] * model.Layers[l + 1];
        macs += 2 * layer + (l > 0 ? layer : 0);
    }
    return 2 * macs;
}
