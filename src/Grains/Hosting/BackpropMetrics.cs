using System.Collections.Concurrent;
using System.Diagnostics.Metrics;
using Backprop.Grains.Messages;

namespace Backprop.Grains.Hosting;

/// <summary>
/// The "Backprop" meter: what the silo's /metrics serves (OpenTelemetry, Prometheus text). Recorded where the facts
/// are: the coordinator once per call window and per epoch, the shards at each checkpoint, the run list when it changes.
/// Labels are bounded: a worker's index within its run and its silo, a run id only while this silo coordinates the
/// run, a run state, an event kind; never a step.
/// </summary>
public static class BackpropMetrics
{
    public const string MeterName = "Backprop";

    private static readonly Meter Meter = new(MeterName);

    // Seconds, from a tenth of a millisecond (a small step on one core) to minutes (a checkpoint to a slow store).
    private static readonly InstrumentAdvice<double> SecondsBuckets = new()
    {
        HistogramBucketBoundaries = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300],
    };

    private static readonly Histogram<double> StepDuration = Seconds("backprop.step.duration", "Wall time of a training step (each call window's mean per step)");
    private static readonly Histogram<double> StepCompute = Seconds("backprop.step.compute.duration", "Backprop and pre-reduction of the slowest worker, per step");
    private static readonly Histogram<double> StepTransfer = Seconds("backprop.step.transfer.duration", "The slowest worker's call overhead and parameter pulls, per step");
    private static readonly Histogram<double> StepReduce = Seconds("backprop.step.reduce_and_step.duration", "Reduction of the block sums and the optimizer step in the slowest shard, per step");
    private static readonly Histogram<double> StepServerCall = Seconds("backprop.step.server_call.duration", "The slowest worker's pushes to the shards minus their reduce-and-step, per step");
    private static readonly Histogram<double> StepBarrier = Seconds("backprop.step.barrier_wait.duration", "From the first worker's reply to the last one's, per step");
    private static readonly Histogram<double> WorkerCompute = Seconds("backprop.worker.compute.duration", "A worker's backprop and pre-reduction per step (attribute: worker index in its run; its silo is on backprop.worker.compute.median)");
    private static readonly Histogram<double> CheckpointDuration = Seconds("backprop.checkpoint.duration", "Writing one shard checkpoint to grain storage");
    // The counters are observed from these totals: each is on /metrics from the start, at 0 until it moves.
    private static long _steps, _samples, _wireBytes, _recoveries, _redos, _resumes, _workerFailures;
    private static long _laneSent, _laneServed, _laneFallbacks, _earlyPushes;

    private static readonly ConcurrentDictionary<string, (double Accuracy, double Loss)> Epochs = new(StringComparer.Ordinal);
    private static readonly ConcurrentDictionary<string, WorkerStats[]> Stragglers = new(StringComparer.Ordinal);
    private static volatile Dictionary<RunState, int> _runsByState = [];
    private static volatile string? _role;

    static BackpropMetrics()
    {
        Meter.CreateObservableCounter("backprop.steps", () => Interlocked.Read(ref _steps), "{step}", "Training steps applied by runs this silo coordinates");
        Meter.CreateObservableCounter("backprop.samples", () => Interlocked.Read(ref _samples), "{sample}", "Training samples in the steps applied");
        Meter.CreateObservableCounter("backprop.wire.bytes", () => Interlocked.Read(ref _wireBytes), "By", "Parameter and gradient bytes that crossed between processes");
        Meter.CreateObservableCounter("backprop.recoveries", () => Interlocked.Read(ref _recoveries), "{recovery}", "Resumed runs whose first step after the resume was applied");
        Meter.CreateObservableCounter("backprop.redos", () => Interlocked.Read(ref _redos), "{redo}", "Blocks or evaluations redone on another worker after a failure");
        Meter.CreateObservableCounter("backprop.resumes", () => Interlocked.Read(ref _resumes), "{resume}", "Runs continued from their last checkpoint by a coordinator");
        Meter.CreateObservableCounter("backprop.lane.calls", () => new[]
            {
                new Measurement<long>(Interlocked.Read(ref _laneSent), new KeyValuePair<string, object?>("direction", "sent")),
                new Measurement<long>(Interlocked.Read(ref _laneServed), new KeyValuePair<string, object?>("direction", "served")),
            }, "{call}", "Pushes and pulls through data lanes: sent by this silo's workers, answered by this silo's lane");
        Meter.CreateObservableCounter("backprop.lane.fallbacks", () => Interlocked.Read(ref _laneFallbacks), "{call}",
            "Pushes and pulls to a shard on another silo that went through Orleans: its lane was not connected (yet)");
        Meter.CreateObservableCounter("backprop.push.early", () => Interlocked.Read(ref _earlyPushes), "{push}",
            "Pushes to a shard on another silo that this silo's workers sent while the rest of their step was still computed");
        Meter.CreateObservableCounter("backprop.worker.failures", () => Interlocked.Read(ref _workerFailures), "{failure}", "Worker calls that failed");
        Meter.CreateObservableGauge("backprop.epoch.test_accuracy", () => Epochs.Select(e => new Measurement<double>(e.Value.Accuracy, new KeyValuePair<string, object?>("run", e.Key))),
            "1", "Test accuracy after the last finished epoch of each run this silo coordinates");
        Meter.CreateObservableGauge("backprop.epoch.test_loss", () => Epochs.Select(e => new Measurement<double>(e.Value.Loss, new KeyValuePair<string, object?>("run", e.Key))),
            "1", "Mean test loss after the last finished epoch of each run this silo coordinates");
        // The live workers of each run this silo coordinates (the current generation), with their silo: series go with them.
        Meter.CreateObservableGauge("backprop.worker.compute.median", () => Stragglers.SelectMany(r => r.Value.Select(w =>
                new Measurement<double>(w.ComputeMedianSeconds,
                    new KeyValuePair<string, object?>("run", r.Key), new KeyValuePair<string, object?>("worker", w.Worker), new KeyValuePair<string, object?>("silo", w.Silo)))),
            "s", "Each live worker's median compute per step over its last 200 steps, for the runs this silo coordinates");
        // Only the stragglers of the current generation: a series exists while its worker is one.
        Meter.CreateObservableGauge("backprop.worker.straggler", () => Stragglers.SelectMany(r => r.Value.Where(w => w.Straggler).Select(w =>
                new Measurement<double>(w.Slowdown(r.Value),
                    new KeyValuePair<string, object?>("run", r.Key), new KeyValuePair<string, object?>("worker", w.Worker), new KeyValuePair<string, object?>("silo", w.Silo)))),
            "1", "A straggler's median compute per step over the median of its run's other workers (> 1.5 to become one); only stragglers of runs this silo coordinates");
        // Every state, zeros included, from the silo that holds the run list (none elsewhere): a sum over silos is the cluster's.
        Meter.CreateObservableGauge("backprop.runs", () => _runsByState.Select(s => new Measurement<int>(s.Value, new KeyValuePair<string, object?>("state", s.Key.ToString().ToLowerInvariant()))),
            "{run}", "Runs in the run list by state");
        // Each silo counts itself: summed over the cluster's silos, the silos by role.
        Meter.CreateObservableGauge("backprop.silos", () => _role is { } role ? [new Measurement<int>(1, new KeyValuePair<string, object?>("role", role))] : Array.Empty<Measurement<int>>(),
            "{silo}", "This silo, by role (sum over silos for the cluster)");
    }

    private static Histogram<double> Seconds(string name, string description) =>
        Meter.CreateHistogram(name, "s", description, tags: null, advice: SecondsBuckets);

    public static void SiloStarted(SiloRole role) => _role = role.ToString().ToLowerInvariant();

    /// <summary>A push or pull through a data lane: sent by a worker here, or answered by this silo's lane.</summary>
    public static void LaneCall(bool served)
    {
        if (served) Interlocked.Increment(ref _laneServed);
        else Interlocked.Increment(ref _laneSent);
    }

    /// <summary>Tests only: the lane counters of this process (every silo in it).</summary>
    internal static (long Sent, long Served, long Fallbacks) LaneTotals =>
        (Interlocked.Read(ref _laneSent), Interlocked.Read(ref _laneServed), Interlocked.Read(ref _laneFallbacks));

    /// <summary>A push sent as soon as its shard's slice of the sum was written, before the step's compute ended.</summary>
    public static void EarlyPush() => Interlocked.Increment(ref _earlyPushes);

    /// <summary>Tests only: the early pushes of this process (every silo in it).</summary>
    internal static long EarlyPushes => Interlocked.Read(ref _earlyPushes);

    /// <summary>A push or pull to a shard whose lane was not connected: it went through Orleans.</summary>
    public static void LaneFallback() => Interlocked.Increment(ref _laneFallbacks);

    /// <summary>
    /// One call window of the coordinator that applied <paramref name="steps"/> steps of <paramref name="samples"/>
    /// samples: its wall time, its breakdown (<paramref name="profile"/>, means per step) and each worker's compute.
    /// </summary>
    public static void Window(int steps, long samples, double seconds, StepProfile profile, ReadOnlySpan<BlockDone> blocks)
    {
        Interlocked.Add(ref _steps, steps);
        Interlocked.Add(ref _samples, samples);
        StepDuration.Record(seconds / steps);
        StepCompute.Record(profile.SlowestComputeSeconds);
        StepTransfer.Record(profile.TransferSeconds);
        StepReduce.Record(profile.ReduceAndStepSeconds);
        StepServerCall.Record(profile.ServerCallSeconds);
        StepBarrier.Record(profile.BarrierWaitSeconds);
        long wire = 0;
        for (int i = 0; i < blocks.Length; i++)
        {
            var b = blocks[i];
            wire += b.WireBytes;
            if (b.Applied > 0)
                WorkerCompute.Record(b.ComputeSeconds / b.Applied, new KeyValuePair<string, object?>("worker", i));
        }
        Interlocked.Add(ref _wireBytes, wire);
    }

    public static void EpochFinished(string runId, double accuracy, double loss) => Epochs[runId] = (accuracy, loss);

    /// <summary>The run's workers' figures after a window (or a new generation): its stragglers' gauges.</summary>
    public static void Workers(string runId, WorkerStats[] workers) => Stragglers[runId] = workers;

    /// <summary>The run's coordinator here has stopped (finished, or gone elsewhere): its gauges go with it.</summary>
    public static void RunLeft(string runId)
    {
        Epochs.TryRemove(runId, out _);
        Stragglers.TryRemove(runId, out _);
    }

    public static void Checkpoint(TimeSpan took) => CheckpointDuration.Record(took.TotalSeconds);

    /// <summary>The run list left this silo: no runs by state from here.</summary>
    public static void RunListLeft() => _runsByState = [];

    /// <summary>The run list changed: its runs by state.</summary>
    public static void RunList(IEnumerable<RunSummary> runs)
    {
        var counts = Enum.GetValues<RunState>().ToDictionary(s => s, _ => 0);
        foreach (var r in runs) counts[r.State]++;
        _runsByState = counts;
    }

    /// <summary>A run event (<see cref="RunEvent.Kind"/>): the ones that are counted.</summary>
    public static void Event(string kind)
    {
        switch (kind)
        {
            case "recovered": Interlocked.Increment(ref _recoveries); break;
            case "redone": Interlocked.Increment(ref _redos); break;
            case "resumed": Interlocked.Increment(ref _resumes); break;
            case "worker-failed": Interlocked.Increment(ref _workerFailures); break;
        }
    }
}
