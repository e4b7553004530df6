using System.Globalization;
using Backprop.Grains.Messages;

namespace Backprop.Client;

/// <summary>
/// The progress of a running run as one line of about 80 columns: the epoch's bar and step, samples a second over the
/// last few seconds, time elapsed since it was first seen, and the time left in the epoch and in the run at that rate
/// (evaluations not counted). Fed with the run's status as it is polled; <paramref name="now"/> is the clock (a test gives its own).
/// </summary>
public sealed class ProgressLine(Func<TimeSpan> now)
{
    private const int Width = 10;
    private static readonly TimeSpan RateWindow = TimeSpan.FromSeconds(10);
    private readonly Queue<(TimeSpan Time, long Step)> _seen = new();
    private TimeSpan? _start;

    /// <summary>The line for this status, or null when the run is not training (not running, or no plan yet).</summary>
    public string? Update(RunStatus status)
    {
        if (status.State != RunState.Running || status.StepsPerEpoch <= 0 || status.Spec is not { } spec) return null;
        var t = now();
        _start ??= t;
        long steps = status.StepsPerEpoch, step = status.Epoch * steps + Math.Min(status.StepInEpoch, steps);
        // A step back (a resume from a checkpoint) starts the rate afresh.
        if (_seen.Count > 0 && step < _seen.Last().Step) _seen.Clear();
        _seen.Enqueue((t, step));
        while (_seen.Count > 2 && t - _seen.Peek().Time > RateWindow) _seen.Dequeue();
        var (firstTime, firstStep) = _seen.Peek();
        double seconds = (t - firstTime).TotalSeconds;
        double? stepsPerSecond = seconds > 0 && step > firstStep ? (step - firstStep) / seconds : null;

        int filled = (int)(Width * Math.Min(status.StepInEpoch, steps) / steps);
        var line = string.Create(CultureInfo.InvariantCulture,
            $"epoch {status.Epoch + 1}/{spec.Epochs} [{new string('#', filled)}{new string('.', Width - filled)}] {status.StepInEpoch}/{steps}");
        line += stepsPerSecond is { } rate
            ? string.Create(CultureInfo.InvariantCulture, $" {rate * spec.BatchSize,7:N0} samples/s  {Clock(t - _start.Value)} elapsed  ETA {Clock((steps - status.StepInEpoch) / rate)} (run {Clock(((long)spec.Epochs * steps - step) / rate)})")
            : $"  {Clock(t - _start.Value)} elapsed";
        return line;
    }

    /// <summary>h:mm:ss or m:ss.</summary>
    public static string Clock(double seconds) => Clock(TimeSpan.FromSeconds(Math.Max(0, Math.Min(seconds, 360_000_000))));

    private static string Clock(TimeSpan t) => t.TotalHours >= 1
        ? string.Create(CultureInfo.InvariantCulture, $"{(int)t.TotalHours}:{t.Minutes:00}:{t.Seconds:00}")
        : string.Create(CultureInfo.InvariantCulture, $"{t.Minutes}:{t.Seconds:00}");
}
