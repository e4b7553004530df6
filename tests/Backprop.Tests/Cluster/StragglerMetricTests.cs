using System.Diagnostics.Metrics;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;

namespace Backprop.Tests.Cluster;

/// <summary>/metrics names stragglers: one series per straggler, its slowdown, and none once its run's coordinator leaves.</summary>
public sealed class StragglerMetricTests
{
    [Fact]
    public void The_straggler_gauge_has_one_series_per_straggler_with_its_slowdown_and_none_after_the_run_left()
    {
        WorkerStats[] workers =
        [
            new(0, "10.0.0.5:11111", 80, 0.010, 0.012, false),
            new(1, "10.0.0.6:11111", 80, 0.011, 0.013, false),
            new(2, "10.0.0.7:11111", 80, 0.023, 0.041, true),
        ];
        string run = $"metric-{Guid.NewGuid():N}";
        BackpropMetrics.Workers(run, workers);
        try
        {
            var seen = Observe(run);
            var (value, tags) = Assert.Single(seen);
            Assert.Equal(0.023 / 0.0105, value, 6);   // over the median of the other two
            Assert.Equal(2, tags["worker"]);
            Assert.Equal("10.0.0.7:11111", tags["silo"]);

            // Recovered: no series.
            BackpropMetrics.Workers(run, [.. workers.Select(w => w with { Straggler = false })]);
            Assert.Empty(Observe(run));
            BackpropMetrics.Workers(run, workers);
            Assert.Single(Observe(run));
        }
        finally
        {
            BackpropMetrics.RunLeft(run);
        }
        Assert.Empty(Observe(run));
    }

    /// <summary>The gauge's measurements for <paramref name="run"/> (other tests' runs in this process are left out).</summary>
    private static List<(double Value, Dictionary<string, object?> Tags)> Observe(string run)
    {
        var seen = new List<(double, Dictionary<string, object?>)>();
        using var listener = new MeterListener();
        listener.InstrumentPublished = (instrument, l) =>
        {
            if (instrument.Meter.Name == BackpropMetrics.MeterName && instrument.Name == "backprop.worker.straggler") l.EnableMeasurementEvents(instrument);
        };
        listener.SetMeasurementEventCallback<double>((_, value, tags, _) =>
        {
            var dict = new Dictionary<string, object?>();
            foreach (var t in tags) dict[t.Key] = t.Value;
            if (Equals(dict.GetValueOrDefault("run"), run)) lock (seen) seen.Add((value, dict));
        });
        listener.Start();
        listener.RecordObservableInstruments();
        return seen;
    }
}
