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
        var bp2 = new BatchBackprop(spec.Model, 64, threads: 2);
        train.CopyInputs(idx, bp2.Input(64));
        Time("forward, 2 threads", () => bp2.Forward(p, 64, labels));
        Time("forward + backward, 2 threads", () => bp2.GradientSum(p, 64, labels, g));
        Time("optimizer (momentum)", () => Optimizer.Step(spec.Optimizer, p.AsSpan().ToArray(), g, 64, v));
        var pc = p.ToArray();
        Time("optimizer in place", () => Optimizer.Step(spec.Optimizer, pc, g, 64, v));
        var order = EpochPlan.Permutation(train.Count, 1, 0);
        var runner = new ChunkRunner(spec.Model, 64);
        int step = 0;
        Time("random chunk: copy + fwd + bwd", () =>
        {
            var chunk = order.AsSpan((step++ % 900) * 64, 64);
            runner.GradientSum(train, p, chunk, g);
        });
        step = 0;
        Time("random chunk + optimizer", () =>
        {
            var chunk = order.AsSpan((step++ % 900) * 64, 64);
            runner.GradientSum(train, pc, chunk, g);
            Optimizer.Step(spec.Optimizer, pc, g, 64, v);
        });
        foreach (int threads in new[] { 1, 2 })
        {
            var r = new ChunkRunner(spec.Model, 64, threads);
            var pp = Initializer.Create(spec.Model, spec.Init, 1);
            var vv = new float[pp.Length];
            for (int e = 0; e < 3; e++)
            {
                var plan = new EpochPlan(train.Count, 64, 64, 1, e);
                long tGrad = 0, tOpt = 0, t0 = Stopwatch.GetTimestamp();
                for (int s = 0; s < plan.Steps; s++)
                {
                    long a = Stopwatch.GetTimestamp();
                    r.GradientSum(train, pp, plan.Chunk(s, 0), g);
                    long b = Stopwatch.GetTimestamp();
                    Optimizer.Step(spec.Optimizer, pp, g, plan.StepSize(s), vv);
                    tOpt += Stopwatch.GetTimestamp() - b;
                    tGrad += b - a;
                }
                double us(long t) => t * 1e6 / Stopwatch.Frequency / plan.Steps;
                Console.WriteLine($"{threads}t epoch {e}: total {us(Stopwatch.GetTimestamp() - t0):F1} us/step, gradient {us(tGrad):F1}, optimizer {us(tOpt):F1}");
            }
            r.Dispose();
        }
        var trainer = new LocalTrainer(spec, train);
        trainer.TrainEpoch(0);
        for (int e = 1; e <= 3; e++)
        {
            var clock = Stopwatch.StartNew();
            trainer.TrainEpoch(e);
            Console.WriteLine($"LocalTrainer epoch {e}: {clock.Elapsed.TotalMicroseconds / 938,8:F1} us/step");
        }
        var trained = trainer.Parameters.ToArray();
        train.CopyInputs(idx, bp.Input(64));
        Time("forward + backward, trained params", () => bp.GradientSum(trained, 64, labels, g));
        Console.WriteLine($"subnormal gradient values: {g.Count(float.IsSubnormal)} of {g.Length}");
        Time("forward + backward, initial params", () => bp.GradientSum(p, 64, labels, g));
        Console.WriteLine($"subnormal gradient values: {g.Count(float.IsSubnormal)} of {g.Length}");
        var fresh = new LocalTrainer(spec, train);
        for (int e = 0; e <= 3; e++)
        {
            var clock = Stopwatch.StartNew();
            fresh.TrainEpoch(0, maxSteps: 300);
            Console.WriteLine($"LocalTrainer epoch 0 first 300 steps, again: {clock.Elapsed.TotalMicroseconds / 300,8:F1} us/step");
        }
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
