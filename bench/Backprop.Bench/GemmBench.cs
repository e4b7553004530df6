using System.Diagnostics;
using Backprop.Core.Numerics;

namespace Backprop.Bench;

/// <summary>GFLOP/s of the kernel on the products of one 784-128-64-10 step at batch 64 (padded layout).</summary>
public static unsafe class GemmBench
{
    /// <summary>
    /// The forward product of the first layer (64 samples × 784 inputs times 784 × 128) by each candidate the
    /// performance issue names: MathNet's managed multiply, System.Numerics.Tensors dot products (this
    /// project's first implementation), and the register-tiled kernel at each vector width.
    /// </summary>
    private static void Candidates()
    {
        const int M = 64, K = 784, N = 128;
        var rng = new Random(3);
        var x = Enumerable.Range(0, M * K).Select(_ => (float)rng.NextDouble()).ToArray();
        var w = Enumerable.Range(0, N * K).Select(_ => (float)rng.NextDouble() - 0.5f).ToArray();
        var z = new float[M * N];
        double flops = 2.0 * M * N * K;
        Report("MathNet.Numerics managed (X · Wᵀ)", flops, () =>
        {
            var xm = MathNet.Numerics.LinearAlgebra.Matrix<float>.Build.Dense(M, K, x);   // column-major view of the same numbers: shape matters, not values
            var wm = MathNet.Numerics.LinearAlgebra.Matrix<float>.Build.Dense(N, K, w);
            return () => xm.TransposeAndMultiply(wm);
        });
        Report("TensorPrimitives.Dot per output", flops, () => () =>
        {
            for (int i = 0; i < M; i++)
                for (int o = 0; o < N; o++)
                    z[i * N + o] = System.Numerics.Tensors.TensorPrimitives.Dot(x.AsSpan(i * K, K), w.AsSpan(o * K, K));
        });
        var xT = GC.AllocateArray<float>(K * M, pinned: true);
        var wp = GC.AllocateArray<float>(N * K, pinned: true);
        var zT = GC.AllocateArray<float>(N * M, pinned: true);
        w.CopyTo(wp, 0);
        foreach (var isa in new[] { Gemm.Isa.Scalar, Gemm.Isa.Vector256, Gemm.Isa.Vector512 }.Where(i => i <= Gemm.Best))
            Report($"tiled kernel, {isa}", flops, () => () =>
            {
                fixed (float* pw = wp, px = xT, pz = zT) Gemm.Multiply(isa, 0, N, M, K, pw, K, 1, px, M, pz, M);
            });
    }

    private static void Report(string name, double flops, Func<Action> setup)
    {
        var action = setup();
        // Half a second of warm-up lets tiered compilation reach its optimised code.
        int reps = 0;
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed.TotalSeconds < 0.5) { action(); reps++; }
        reps = Math.Max(3, reps / 10);
        var times = new List<double>();
        for (int t = 0; t < 5; t++)
        {
            clock.Restart();
            for (int r = 0; r < reps; r++) action();
            times.Add(clock.Elapsed.TotalSeconds / reps);
        }
        times.Sort();
        Console.WriteLine($"candidate {name,-38} {times[2] * 1e6,9:F1} us  {flops / times[2] / 1e9,6:F1} GFLOP/s");
    }

    public static int Run()
    {
        // (name, m, n, k, aRow, aCol, ldb)
        var shapes = new (string Name, int M, int N, int K, int ARow, int ACol, int Ldb)[]
        {
            ("fwd  L1 128x64x784", 128, 64, 784, 784, 1, 64),
            ("dW   L1 128x784x64", 128, 784, 64, 64, 1, 784),
            ("fwd  L2 64x64x128", 64, 64, 128, 128, 1, 64),
            ("dW   L2 64x128x64", 64, 128, 64, 64, 1, 128),
            ("dX   L2 128x64x64", 128, 64, 64, 1, 128, 64),
        };
        using var two = new RowParallel(2);
        foreach (var (isa, parallel) in new[] { (Gemm.Isa.Vector512, two), (Gemm.Isa.Vector512, (RowParallel?)null), (Gemm.Isa.Vector256, null), (Gemm.Isa.Vector512, two) })
        {
            foreach (var s in shapes)
            {
                var a = GC.AllocateArray<float>(s.M * s.K + s.K * s.M, pinned: true);
                var b = GC.AllocateArray<float>(s.K * s.Ldb + s.N, pinned: true);
                var c = GC.AllocateArray<float>(s.M * s.N, pinned: true);
                new Random(1).NextBytes(new byte[1]);
                for (int i = 0; i < a.Length; i++) a[i] = i % 7 * 0.1f;
                for (int i = 0; i < b.Length; i++) b[i] = i % 5 * 0.1f;
                fixed (float* pa = a, pb = b, pc = c)
                {
                    int reps = (int)(2e9 / (2.0 * s.M * s.N * s.K));
                    var times = new List<double>();
                    for (int trial = 0; trial < 7; trial++)
                    {
                        var clock = Stopwatch.StartNew();
                        if (parallel is null)
                            for (int r = 0; r < reps; r++) Gemm.Multiply(isa, 0, s.M, s.N, s.K, pa, s.ARow, s.ACol, pb, s.Ldb, pc, s.N);
                        else
                        {
                            var job = new GemmJob(isa, s.N, s.K, pa, s.ARow, s.ACol, pb, s.Ldb, pc, s.N);
                            Action<int, int> rows = job.Rows;
                            for (int r = 0; r < reps; r++) parallel.Run(s.M, rows);
                        }
                        times.Add(clock.Elapsed.TotalSeconds / reps);
                    }
                    times.Sort();
                    double t = times[3];
                    Console.WriteLine($"{isa,-9} {(parallel is null ? 1 : 2)}t {s.Name,-20} {t * 1e6,8:F1} us  {2.0 * s.M * s.N * s.K / t / 1e9,6:F1} GFLOP/s");
                }
            }
        }
        Candidates();

        // Hand-off cost: a tiny product split over 2 threads, back to back and with serial work between.
        var ta = GC.AllocateArray<float>(64 * 64, pinned: true);
        var tc = GC.AllocateArray<float>(64 * 64, pinned: true);
        fixed (float* pa = ta, pc = tc)
        {
            foreach (int gapMicros in new[] { 0, 20, 100 })
            {
                var tiny = new GemmJob(Gemm.Isa.Vector512, 16, 4, pa, 4, 1, pa, 16, pc, 16);
                Action<int, int> job = tiny.Rows;
                for (int i = 0; i < 1000; i++) two.Run(32, job);
                var clock = Stopwatch.StartNew();
                const int runs = 5000;
                long gapTicks = (long)(gapMicros * Stopwatch.Frequency / 1e6);
                long gaps = 0;
                for (int i = 0; i < runs; i++)
                {
                    two.Run(32, job);
                    long start = Stopwatch.GetTimestamp();
                    while (Stopwatch.GetTimestamp() - start < gapTicks) { }
                    gaps += Stopwatch.GetTimestamp() - start;
                }
                double perRun = (clock.Elapsed.TotalSeconds - gaps / (double)Stopwatch.Frequency) / runs;
                Console.WriteLine($"hand-off to 2 threads with {gapMicros} us serial work between: {perRun * 1e6:F2} us per run");
            }
        }
        return 0;
    }
}
