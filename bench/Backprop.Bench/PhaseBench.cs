using System.Diagnostics;
using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;

namespace Backprop.Bench;

/// <summary>Microseconds per call of each part of one 784-128-64-10 step at batch 64: where a step's time goes.</summary>
public static class PhaseBench
{
    public static int Run(Dataset train)
    {
        var spec = Presets.PyTorchMlp with { ChunkSize = 64 };
        var p = Initializer.Create(spec.Model, spec.Init, 1);
        var g = new float[p.Length];
        var v = new float[p.Length];
        var labels = train.Labels.AsSpan(0, 64).ToArray();
        var first = Enumerable.Range(0, 64).ToArray();
        var xs = new float[64 * 784];
        var xt = new float[784 * 64];
        Console.WriteLine($"{"core-to-core round trip (at the start)",-44} {CoreToCore.RoundTripNanoseconds(),8:F0} ns");
        Time("copy inputs only", () => train.CopyInputs(first, xs));
        Time("transpose 64x784 only", () => { unsafe { fixed (float* a = xs, b = xt) Transpose.Run(a, 64, 784, 784, b, 64); } });
        foreach (int threads in new[] { 1, 2 })
        {
            // Each thread loads its own copy of the inputs when its first forward rows need them.
            using var bp = new BatchBackprop(spec.Model, 64, threads);
            bp.LoadInputs(train, first);
            Time($"{threads}t forward, hot caches", () => bp.Forward(p, 64, labels));
            Time($"{threads}t load (same 64 samples) + forward", () => { bp.LoadInputs(train, first); bp.Forward(p, 64, labels); });
            Time($"{threads}t forward + backward, hot caches", () => bp.GradientSum(p, 64, labels, g));
            Time($"{threads}t load (same samples) + forward + backward", () => { bp.LoadInputs(train, first); bp.GradientSum(p, 64, labels, g); });
        }
        Time("optimizer step (momentum), 1 thread", () => Optimizer.For(spec.Optimizer).Step(0, p, g, 64, v));

        var order = EpochPlan.Permutation(train.Count, 1, 0);
        foreach (int threads in new[] { 1, 2 })
        {
            using var runner = new ChunkRunner(spec.Model, 64, threads);
            using var loader = new BatchBackprop(spec.Model, 64, threads);
            int at = 0;
            Time($"{threads}t load (random 64 samples) + forward", () =>
            {
                loader.LoadInputs(train, order.AsSpan((at++ % 900) * 64, 64));
                loader.Forward(p, 64, labels);
            });
            int step = 0;
            Time($"{threads}t random chunk: load + forward + backward", () =>
                runner.GradientSum(train, p, order.AsSpan((step++ % 900) * 64, 64), g));
        }

        foreach (int threads in new[] { 1, 2 })
        {
            using var trainer = new LocalTrainer(spec, train, threads);
            trainer.TrainEpoch(0);
            for (int e = 1; e <= 3; e++)
            {
                long start = Stopwatch.GetTimestamp();
                trainer.TrainEpoch(e);
                Console.WriteLine($"{threads}t LocalTrainer epoch {e} (whole step) {Stopwatch.GetElapsedTime(start).TotalMicroseconds / 938,8:F1} us");
            }
        }
        Console.WriteLine($"{"core-to-core round trip (at the end)",-44} {CoreToCore.RoundTripNanoseconds(),8:F0} ns");
        return 0;
    }

    private static void Time(string name, Action action)
    {
        // Half a second of warm-up lets tiered compilation reach its optimised code.
        long warm = Stopwatch.GetTimestamp();
        while (Stopwatch.GetElapsedTime(warm).TotalSeconds < 0.5) action();
        var times = new List<double>();
        for (int t = 0; t < 7; t++)
        {
            long start = Stopwatch.GetTimestamp();
            for (int i = 0; i < 500; i++) action();
            times.Add(Stopwatch.GetElapsedTime(start).TotalMicroseconds / 500);
        }
        times.Sort();
        Console.WriteLine($"{name,-44} {times[3],8:F1} us");
    }
}
