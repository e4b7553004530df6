using System.Text.Json;
using Backprop.Client;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Messages;

namespace Backprop.Tests.Cluster;

/// <summary>The coordinator's straggler rule, fed window replies as the workers send them.</summary>
public sealed class WorkerTimesTests
{
    /// <summary>One window of <paramref name="steps"/> steps: worker b took <paramref name="secondsPerStep"/>[b] per step, on silo "s{b}".</summary>
    private static BlockDone?[] Window(ChunkBlocks cut, int steps, params double[] secondsPerStep) =>
        Enumerable.Range(0, cut.Count).Select(b => (BlockDone?)new BlockDone(cut.First(b), new double[steps], $"s{b}",
            secondsPerStep[b] * steps, 0, 0, 0, false, 0, 0, null, 0)).ToArray();

    [Fact]
    public void A_slow_worker_is_named_once_when_every_worker_has_enough_steps_and_cleared_once_when_its_median_is_back()
    {
        var times = new WorkerTimes();
        var even = ChunkBlocks.For(6, 3);
        var events = new List<(int Window, string Kind, string Message)>();
        // 10 steps a window; worker 2 takes 3x as long: judged from the 5th window (50 steps) on.
        for (int w = 1; w <= 8; w++)
            events.AddRange(times.Add(Window(even, 10, 0.010, 0.010, 0.030), even).Select(e => (w, e.Kind, e.Message)));
        var named = Assert.Single(events);
        Assert.Equal((5, "straggler", "worker 2 on s2 is 3.0x slower than the median (p95 30 ms vs 10 ms)"), named);
        Assert.Equal([false, false, true], times.Stats.Select(s => s.Straggler));
        Assert.Equal([0, 1, 2], times.Stats.Select(s => s.Worker));
        Assert.All(times.Stats, s => Assert.Equal(80, s.Blocks));
        Assert.Equal(0.030, times.Stats[2].ComputeMedianSeconds, 12);

        // Back to speed: it stays named until half of the steps it holds are fast (80 slow ones are held).
        events.Clear();
        for (int w = 1; w <= 10; w++)
            events.AddRange(times.Add(Window(even, 10, 0.010, 0.010, 0.010), even).Select(e => (w, e.Kind, e.Message)));
        Assert.Equal((8, "straggler-cleared", "worker 2 on s2 is back under 1.25x the median (1.0x now)"), Assert.Single(events));
        Assert.All(times.Stats, s => Assert.False(s.Straggler));
    }

    [Theory]
    // 2 workers, one 2x slower: against the median of both (1.33x) it would never be named.
    [InlineData(2, new[] { 0.010, 0.020 }, new[] { 1 }, "worker 1 on s1 is 2.0x slower than the median (p95 20 ms vs 10 ms)")]
    // 4 workers, 2 of them on a silo 2x slower: each is compared with the 3 others (median 10 ms).
    [InlineData(4, new[] { 0.010, 0.020, 0.010, 0.020 }, new[] { 1, 3 }, "worker 1 on s1 is 2.0x slower than the median (p95 20 ms vs 10 ms)")]
    public void With_an_even_worker_count_a_slow_worker_is_compared_with_the_others_and_named(int workers, double[] seconds, int[] slow, string first)
    {
        var times = new WorkerTimes();
        var cut = ChunkBlocks.For(workers, workers);
        var events = new List<(string Kind, string Message)>();
        for (int w = 0; w < 6; w++) events.AddRange(times.Add(Window(cut, 10, seconds), cut));
        Assert.Equal(slow, times.Stats.Where(s => s.Straggler).Select(s => s.Worker));
        Assert.Equal(slow.Length, events.Count(e => e.Kind == "straggler"));
        Assert.Equal(first, events[0].Message);
    }

    [Fact]
    public void Figures_cover_the_last_200_steps_the_oldest_window_in_part()
    {
        var times = new WorkerTimes();
        var cut = ChunkBlocks.For(2, 2);
        times.Add(Window(cut, 150, 0.050, 0.010), cut);
        // 100 new steps push out 50 of the 150 old ones: 100 at 50 ms and 100 at 20 ms are held.
        times.Add(Window(cut, 100, 0.020, 0.010), cut);
        Assert.Equal(0.020, times.Stats[0].ComputeMedianSeconds, 12);
        Assert.Equal(0.050, times.Stats[0].ComputeP95Seconds, 12);
        times.Add(Window(cut, 1, 0.020, 0.010), cut);
        Assert.Equal(0.020, times.Stats[0].ComputeMedianSeconds, 12);
        Assert.Equal(251, times.Stats[0].Blocks);
    }

    [Fact]
    public void A_worker_with_a_larger_block_is_not_slow_for_it()
    {
        // 3 workers on 4 chunks: blocks of 1, 1 and 2 chunks; the third takes twice as long, as it should.
        var times = new WorkerTimes();
        var uneven = ChunkBlocks.For(4, 3);
        Assert.Equal(2, uneven.End(2) - uneven.First(2));
        for (int w = 0; w < 20; w++) Assert.Empty(times.Add(Window(uneven, 10, 0.010, 0.010, 0.020), uneven));
        Assert.All(times.Stats, s => Assert.False(s.Straggler));
        // Each scaled to the average block of 4/3 chunks.
        Assert.All(times.Stats, s => Assert.Equal(0.010 * 4 / 3, s.ComputeMedianSeconds, 12));
    }

    [Fact]
    public void A_failed_call_counts_for_nobody_and_a_new_generation_starts_afresh_ending_its_stragglers()
    {
        var times = new WorkerTimes();
        var cut = ChunkBlocks.For(2, 2);
        var window = Window(cut, 60, 0.010, 0.040);
        window[0] = null;
        Assert.Empty(times.Add(window, cut));
        Assert.Equal([1], times.Stats.Select(s => s.Worker));
        Assert.Equal("straggler", Assert.Single(times.Add(Window(cut, 60, 0.010, 0.040), cut)).Kind);

        var ended = Assert.Single(times.Reset(generation: 1));
        Assert.Equal(("straggler-cleared", "worker 1 on s1 is measured no more: generation 1 of workers replaced it"), ended);
        Assert.Empty(times.Stats);
        Assert.Empty(times.Add(Window(cut, 60, 0.010, 0.010), cut));
    }

    [Fact]
    public void Status_prints_the_workers_table_and_names_the_straggler_and_json_has_the_workers()
    {
        WorkerStats[] workers =
        [
            new(0, "10.0.0.5:11111", 938, 0.0192, 0.019, false),
            new(1, "10.0.0.6:11111", 938, 0.0188, 0.0185, false),
            new(3, "10.0.0.7:11111", 938, 0.0399, 0.041, true),
        ];
        var status = new RunStatus("r", RunState.Running, null, 0, 5, 100, [], null, [], "10.0.0.5:11111", [], 5, [], 0, workers);
        var text = new StringWriter();
        RunReporter.PrintStatus(text, status);
        var lines = text.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.Contains("3  10.0.0.7:11111              938         40        41  straggler", lines);
        Assert.Contains("0  10.0.0.5:11111              938         19        19", lines);
        Assert.Contains("worker 3 on 10.0.0.7:11111 is 2.1x slower than the median (p95 41 ms vs 19 ms)", lines);

        var json = JsonDocument.Parse(RunReporter.StatusJson(status)).RootElement.GetProperty("workers");
        Assert.Equal(3, json.GetArrayLength());
        var third = json[2];
        Assert.Equal(3, third.GetProperty("id").GetInt32());
        Assert.Equal("10.0.0.7:11111", third.GetProperty("silo").GetString());
        Assert.Equal(938, third.GetProperty("blocks").GetInt32());
        Assert.Equal(0.0399, third.GetProperty("computeMedianSeconds").GetDouble());
        Assert.Equal(0.041, third.GetProperty("computeP95Seconds").GetDouble());
        Assert.True(third.GetProperty("straggler").GetBoolean());
        Assert.False(json[0].GetProperty("straggler").GetBoolean());
    }
}
