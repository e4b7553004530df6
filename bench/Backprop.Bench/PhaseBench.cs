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
        var bp = new BatchBackprop(spec.Model, 64);
        var labels = train.Labels.AsSpan(0, 64).ToArray();
        var idx = Enumerable.Range(0, 64).ToArray();
        train.CopyInputs(idx, bp.Input(64));
        Time("copy inputs (bytes -> float)", () => train.CopyInputs(idx, bp.Input(64)));
        Time("forward", () => bp.Forward(p, 64, labels));
        Time("forward + backward", () => bp.GradientSum(p, 64, labels, g));
        Time("optimizer (momentum)", () => Optimizer.Step(spec.Optimizer, p.AsSpan().ToArray(), g, 64, v));
        var pc = p.ToArray();
        Time("optimizer in place", () => Optimizer.Step(spec.Optimizer, pc, g, 64, v));
        return 0;
    }

    private static void Time(string name, Action action)
    {
        for (int i = 0; i < 200; i++) action();
        var times = new List<double>();
        for (int t = 0; t < 7; t++)
        {
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < 500; i++) action();
            times.Add(clock.Elapsed.TotalMicroseconds / 500);
        }
        times.Sort();
        Console.WriteLine($"{name,-32} {times[3],8:F1} us");
    }
}
