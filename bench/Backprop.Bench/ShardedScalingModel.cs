using System.Text.Json;

namespace Backprop.Bench;

/// <summary>
/// `bench scaling --sharded --rows FILE ...`: the step model of the sharded design (one worker and one shard per
/// machine, workers push to and pull from every shard), checked against `cluster --hosts` rows and predicting weak
/// scaling (per-worker batch fixed) on 1..64 machines. Per step on N machines, V parameter bytes, S = N shards:
///   compute  a · b                              a: compute per sample of one machine (core rows), b: per-worker batch
///   pass     (N + 4) · (V/N) / R                R: a shard's fused reduce + optimizer pass, bytes per second
///   wire     2 · V·(N−1)/N · 8 / BW             the pushes, then the next versions: each phase moves V·(N−1)/N
///                                               through every host's link in each direction (full duplex)
///   cpu      2 · V·(N−1)/N / T                  T: what one process moves between processes per second (pushes + replies;
///                                               processes rows, beyond the pass and the sibling's wait)
///   calls    o · N                              o: one push's own cost beyond the shard's pass and the wait for its
///                                               sibling (embedded row; a worker makes N a step)
/// With one shard (S = 1) the shard's host carries (N−1)·V in each phase: wire 2·(N−1)·V·8/BW, cpu 2·(N−1)·V/T.
/// Three forms of the per-byte terms: added (a message is serialized, then sent, then read: Orleans' connection);
/// streamed (each phase takes max(wire, cpu): the data lane reads a vector into its array while the rest of it is
/// still on the wire); overlapped (streamed, and the pushes leave slice by slice while the worker's last chunk
/// writes its weight gradients, a share f3 of that chunk's compute: of the push phase, the part beyond
/// max(push − f3·chunk, push/N) is hidden, the last slice leaving at the end; only η of it, since the sends take
/// cycles and memory bandwidth from the compute: η = <see cref="OverlapEfficiency"/>, measured). The check prints
/// all three against the hosts rows; the predictions use the overlapped form (one chunk per worker) and print the
/// streamed one beside it.
/// </summary>
public static class ShardedScalingModel
{
    /// <summary>
    /// η: the share of the push time that the full overlap would hide which early pushes did hide, on the 16-core
    /// machine (results/device16-ab-early-pushes-ebb907f-vs-0330b59.jsonl, 8 silo processes, 784-1024-1024-10, a chunk
    /// of 256 per worker): the push call fell from 10.4 to 6.8 ms a step while the compute grew by 1.7 ms; the step fell
    /// by 2.0 ms (mean of the three pairs) of the ~4 ms the full overlap hides there.
    /// </summary>
    private const double OverlapEfficiency = 0.5;

    private sealed record Row(string Mode, int Hosts, int Shards, int Batch, int Chunk, string Model, long Parameters, double StepUs, double ComputeUs,
        double ReduceUs, double SamplesPerEpoch, double SecondsPerEpoch, string? Link, double WireBytes, double ServerCallUs, double FastestComputeUs);

    public static int Run(IReadOnlyList<string> files, string? plotPath)
    {
        var rows = files.SelectMany(File.ReadLines).Where(l => l.TrimStart().StartsWith('{')).Select(Parse).OfType<Row>().ToList();
        var hostRows = rows.Where(r => r.Mode == "hosts").ToList();
        var core = rows.FirstOrDefault(r => r.Mode == "core" && r.Model == hostRows.FirstOrDefault()?.Model);
        var processRows = rows.Where(r => r.Mode == "processes" && r.WireBytes > 0).ToList();
        var processes = processRows.FirstOrDefault();
        var embedded = rows.FirstOrDefault(r => r.Mode == "embedded" && r.Shards > 0);
        if (hostRows.Count == 0 || core is null || processes is null || embedded is null)
        {
            Console.Error.WriteLine("scaling --sharded needs hosts rows with their core row (cluster --hosts ...) and a cluster row each of modes embedded and processes");
            return 2;
        }
        double perSampleUs = core.SecondsPerEpoch * 1e6 / core.SamplesPerEpoch;
        // Between processes: each processes row's wire bytes over its push time beyond the shards' pass and the wait for
        // the sibling block (the model counts those apart), the mean over the rows. The whole push time as well, as
        // fitted before the data lane (it counts the pass twice).
        double orleansBytesPerUs = processRows.Average(p => p.WireBytes / Math.Max(1, p.ServerCallUs - p.ReduceUs - (p.ComputeUs - p.FastestComputeUs)));
        double wholeCallBytesPerUs = processRows.Average(p => p.WireBytes / Math.Max(1, p.ServerCallUs));
        double passBytesPerUs = (embedded.Shards == 0 ? 1 : (embedded.Hosts + 4.0) * embedded.Parameters * 4 / embedded.Shards) / Math.Max(1, embedded.ReduceUs);
        // A push's call time holds the shard's pass (the last block waits for it) and the wait for the sibling block.
        double pushUs = Math.Max(0, embedded.ServerCallUs - embedded.ReduceUs - (embedded.ComputeUs - embedded.FastestComputeUs)) / Math.Max(1, embedded.Shards);
        Console.WriteLine($"Fitted: compute {perSampleUs:F1} µs/sample a machine ({core.Model}, core row); shard pass {passBytesPerUs / 1e3:F1} GB/s; " +
            $"between processes {orleansBytesPerUs / 1e3:F2} GB/s ({wholeCallBytesPerUs / 1e3:F2} over the whole push call); {pushUs:F0} µs a push beyond the pass and the sibling's wait (embedded row)");
        Console.WriteLine();

        Console.WriteLine("| hosts | link | S | measured ms/step | model, added ms/step | added/measured | model, streamed ms/step | streamed/measured | model, overlapped | overlapped/measured |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|");
        foreach (var h in hostRows.OrderBy(r => r.Link).ThenBy(r => r.Hosts).ThenBy(r => r.Shards))
        {
            // All emulated hosts share this machine's cores: compute and the shards' pass are the row's own.
            double bw = LinkBitsPerSecond(h.Link!);
            double wire = Wire(h.Parameters * 4L, h.Hosts, h.Shards, bw), cpu = Cpu(h.Parameters * 4L, h.Hosts, h.Shards, orleansBytesPerUs);
            double added = h.ComputeUs + h.ReduceUs + wire + cpu + pushUs * h.Shards;
            double streamed = h.ComputeUs + h.ReduceUs + Math.Max(wire, cpu) + pushUs * h.Shards;
            // The slowest worker's last chunk: the batch's chunks cut over the hosts, the largest block first.
            int chunksPerWorker = (int)Math.Ceiling(Math.Ceiling(h.Batch / (double)h.Chunk) / h.Hosts);
            double window = WeightGradientShare(h.Model) * h.ComputeUs / Math.Max(1, chunksPerWorker);
            double overlapped = h.ComputeUs + h.ReduceUs + Overlapped(Math.Max(wire, cpu) / 2, window, h.Shards) + Math.Max(wire, cpu) / 2 + pushUs * h.Shards;
            Console.WriteLine($"| {h.Hosts} | {h.Link} | {h.Shards} | {h.StepUs / 1e3:F1} | {added / 1e3:F1} | {added / h.StepUs:F2} | {streamed / 1e3:F1} | {streamed / h.StepUs:F2} | {overlapped / 1e3:F1} | {overlapped / h.StepUs:F2} |");
        }
        Console.WriteLine();

        int[] ns = [1, 2, 4, 8, 16, 32, 64];
        double[] rates = [10e9, 25e9, 100e9];
        var weak = new List<(string Label, double[] Efficiency)>();
        var strong = new List<(string Label, double[] Speedup)>();
        foreach (var (model, parameters) in new[] { ("784-1024-1024-10", 1_863_690L), ("784-4096-4096-10", 20_037_642L) })
        {
            // Compute scales with the work per sample: multiply-adds of the model against those of the core row's model.
            double perSample = perSampleUs * Flops(model) / Flops(core.Model), f3 = WeightGradientShare(model);
            double StepAt(double computeUs, int n, double bw, bool overlap) =>
                Step(computeUs, parameters * 4, n, bw, passBytesPerUs, orleansBytesPerUs, pushUs, overlap ? f3 : 0);
            foreach (int b in new[] { 64, 256 })
            {
                Console.WriteLine($"Weak scaling, {model}, {b} samples per worker a step (S = N; overlapped, streamed in brackets):");
                Console.WriteLine();
                Console.WriteLine("| machines | 10 Gb/s ms/step | eff. | 25 Gb/s ms/step | eff. | 100 Gb/s ms/step | eff. |");
                Console.WriteLine("|---|---|---|---|---|---|---|");
                var eff25 = new double[ns.Length];
                for (int k = 0; k < ns.Length; k++)
                {
                    int n = ns[k];
                    var cells = rates.Select(bw =>
                    {
                        double one = StepAt(perSample * b, 1, bw, true), many = StepAt(perSample * b, n, bw, true);
                        double streamed = StepAt(perSample * b, n, bw, false);
                        if (bw == 25e9) eff25[k] = one / many;
                        return $"{many / 1e3:F1} ({streamed / 1e3:F1}) | {one / many:P0} ({one / streamed:P0})";
                    });
                    Console.WriteLine($"| {n} | {string.Join(" | ", cells)} |");
                }
                Console.WriteLine();
                weak.Add(($"{model}, {b}/worker", eff25));
            }
            // Strong scaling: one global batch cut over the machines (a chunk per worker), the epoch's steps unchanged.
            const int batch = 4096;
            Console.WriteLine($"Strong scaling, {model}, global batch {batch} (S = N, overlapped): ms/step and speed-up over one machine");
            Console.WriteLine();
            Console.WriteLine("| machines | per worker | 10 Gb/s ms/step | speed-up | 25 Gb/s ms/step | speed-up | 100 Gb/s ms/step | speed-up |");
            Console.WriteLine("|---|---|---|---|---|---|---|---|");
            var speedup25 = new double[ns.Length];
            for (int k = 0; k < ns.Length; k++)
            {
                int n = ns[k];
                var cells = rates.Select(bw =>
                {
                    double one = StepAt(perSample * batch, 1, bw, true), many = StepAt(perSample * batch / n, n, bw, true);
                    if (bw == 25e9) speedup25[k] = one / many;
                    return $"{many / 1e3:F1} | {one / many:F1}×";
                });
                Console.WriteLine($"| {n} | {batch / n} | {string.Join(" | ", cells)} |");
            }
            Console.WriteLine();
            strong.Add(($"{model}, batch {batch}", speedup25));
        }
        if (plotPath is not null)
        {
            Plot(plotPath, "weak-scaling efficiency at 25 Gb/s (%)", "Sharded parameter server, modelled weak scaling (S = N)",
                weak.Select(w => (w.Label, w.Efficiency.Select(e => e * 100).ToArray())), 105);
            string strongPath = Path.ChangeExtension(plotPath, null) + "-strong.png";
            Plot(strongPath, "speed-up over one machine at 25 Gb/s", "Sharded parameter server, modelled strong scaling (S = N)", strong, 64);
        }
        return 0;

        void Plot(string path, string yLabel, string title, IEnumerable<(string Label, double[] Values)> lines, double yMax)
        {
            var plot = new ScottPlot.Plot();
            foreach (var (label, values) in lines)
                plot.Add.Scatter(ns.Select(n => Math.Log2(n)).ToArray(), values).LegendText = label;
            plot.Axes.Bottom.Label.Text = "machines (log2)";
            plot.Axes.Left.Label.Text = yLabel;
            plot.Title(title);
            plot.Axes.SetLimitsY(0, yMax);
            plot.ShowLegend();
            plot.SavePng(path, 800, 500);
            Console.WriteLine($"plot: {path}");
        }
    }

    /// <summary>One step on n machines; <paramref name="f3"/> &gt; 0: the pushes overlap that share of the compute (one chunk per worker).</summary>
    private static double Step(double computeUs, long vectorBytes, int n, double bw, double passBytesPerUs, double orleansBytesPerUs, double pushUs, double f3)
    {
        double phase = Math.Max(Wire(vectorBytes, n, n, bw), Cpu(vectorBytes, n, n, orleansBytesPerUs)) / 2;
        return computeUs + (n + 4.0) * vectorBytes / n / passBytesPerUs + Overlapped(phase, f3 * computeUs, n) + phase + pushUs * n;
    }

    /// <summary>
    /// A push phase of <paramref name="push"/> µs whose slices leave during a window of <paramref name="window"/> µs
    /// before the compute ends: what is left after it (at least the last of n slices), plus what the overlap costs the compute.
    /// </summary>
    private static double Overlapped(double push, double window, int n) => push - OverlapEfficiency * (push - Math.Max(push - window, push / n));

    /// <summary>
    /// The share of one chunk's compute during which its weight gradients (the sum) are written: Σ in·out of every layer
    /// (BP4), against forward (Σ in·out), BP4 and the deltas below the last layer (Σ in·out of the layers after the first).
    /// </summary>
    private static double WeightGradientShare(string model)
    {
        var layers = model.Split('-').Select(double.Parse).ToArray();
        double all = Flops(model), later = 0;
        for (int l = 1; l + 1 < layers.Length; l++) later += layers[l] * layers[l + 1];
        return all / (2 * all + later);
    }

    /// <summary>Bytes the busiest host carries in one phase (pushes in, or next versions out): its shards' slices from or to the N − 1 others.</summary>
    private static double PhaseBytes(long vectorBytes, int n, int shards) => n == 1 ? 0 : vectorBytes * (double)Math.Ceiling(shards / (double)n) / shards * (n - 1);

    private static double Wire(long vectorBytes, int n, int shards, double bitsPerSecond) => 2 * PhaseBytes(vectorBytes, n, shards) * 8 / bitsPerSecond * 1e6;

    private static double Cpu(long vectorBytes, int n, int shards, double bytesPerUs) => 2 * PhaseBytes(vectorBytes, n, shards) / bytesPerUs;

    private static double Flops(string model)
    {
        var layers = model.Split('-').Select(double.Parse).ToArray();
        double sum = 0;
        for (int l = 0; l + 1 < layers.Length; l++) sum += layers[l] * layers[l + 1];
        return sum;
    }

    private static double LinkBitsPerSecond(string link)
    {
        double unit = link.EndsWith("gbit") ? 1e9 : link.EndsWith("mbit") ? 1e6 : link.EndsWith("kbit") ? 1e3 : 1;
        return double.Parse(new string(link.TakeWhile(char.IsDigit).ToArray())) * unit;
    }

    private static Row? Parse(string line)
    {
        var r = JsonDocument.Parse(line).RootElement;
        var step = r.TryGetProperty("stepMicroseconds", out var s) && s.ValueKind == JsonValueKind.Object ? s : (JsonElement?)null;
        double Field(string name) => step is { } st ? st.GetProperty(name).GetDouble() : 0;
        return new Row(r.GetProperty("mode").GetString()!, r.TryGetProperty("hosts", out var h) && h.ValueKind == JsonValueKind.Number ? h.GetInt32() : r.GetProperty("workers").GetInt32(),
            r.TryGetProperty("serverShards", out var sh) ? sh.GetInt32() : 1, r.GetProperty("batchSize").GetInt32(),
            r.TryGetProperty("chunkSize", out var c) ? c.GetInt32() : r.GetProperty("batchSize").GetInt32() / 4, r.GetProperty("model").GetString()!,
            r.GetProperty("parameters").GetInt64(), r.GetProperty("microsecondsPerStep").GetDouble(), Field("slowestCompute"), Field("reduceAndStep"),
            r.GetProperty("samplesPerEpoch").GetDouble(), r.GetProperty("secondsPerEpochMedian").GetDouble(),
            r.TryGetProperty("link", out var l) && l.ValueKind == JsonValueKind.String ? l.GetString() : null,
            r.TryGetProperty("wireBytesPerStep", out var w) && w.ValueKind == JsonValueKind.Number ? w.GetDouble() : 0, Field("serverCall"), Field("fastestCompute"));
    }
}
