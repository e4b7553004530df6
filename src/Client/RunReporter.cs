using System.Globalization;
using System.Text.Json;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Messages;

namespace Backprop.Client;

/// <summary>
/// Follows a run: one table row per finished epoch, a progress bar within the epoch when stdout is a
/// terminal, and optionally one JSON line per epoch to a metrics file.
/// </summary>
public sealed class RunReporter(TextWriter output, string? metricsPath)
{
    private static readonly CultureInfo Inv = CultureInfo.InvariantCulture;
    private readonly bool _terminal = !Console.IsOutputRedirected;
    private int _printed;
    private bool _barShown;

    // The project builds with invariant globalization, so plain interpolation formats numbers invariantly.
    public static string Describe(RunSpec s) =>
        $"{s.Model.Describe()}, init {s.Init.ToString().ToLowerInvariant()}; {s.Optimizer.Kind.ToString().ToLowerInvariant()} lr {s.Optimizer.LearningRate}" +
        (s.Optimizer.Kind == Backprop.Core.Numerics.OptimizerKind.Momentum ? $" momentum {s.Optimizer.Momentum}" : "") +
        $"; batch {s.BatchSize}, chunk {s.ChunkSize}; {s.Workers} worker{(s.Workers == 1 ? "" : "s")}; {s.Epochs} epochs; dataset {s.Dataset}" +
        (s.TrainLimit > 0 ? $" (first {s.TrainLimit} training images)" : "") + $"; seed {s.Seed}";

    public void Header() =>
        output.WriteLine($"{"epoch",5}  {"train loss",10}  {"test loss",9}  {"test acc",8}  {"seconds",7}  {"samples/s",9}");

    /// <summary>Shows progress until the run finishes; returns its final status.</summary>
    public async Task<RunStatus> Follow(IRunGrain run, CancellationToken cancel)
    {
        if (metricsPath is not null && Path.GetDirectoryName(Path.GetFullPath(metricsPath)) is { } dir) Directory.CreateDirectory(dir);
        while (true)
        {
            cancel.ThrowIfCancellationRequested();
            // The wait returns early when the run ends, and otherwise paces the progress display.
            var status = await run.WaitForFinish(TimeSpan.FromMilliseconds(300)).WaitAsync(cancel);
            Report(status);
            if (status.IsFinished) return status;
        }
    }

    public void Report(RunStatus status)
    {
        while (_printed < status.Epochs.Length)
        {
            ClearBar();
            var e = status.Epochs[_printed++];
            output.WriteLine(string.Create(Inv,
                $"{e.Epoch,5}  {e.TrainLoss,10:F4}  {e.TestLoss,9:F4}  {e.TestAccuracy * 100,7:F2}%  {e.Seconds,7:F1}  {e.SamplesPerSecond,9:F0}"));
            if (metricsPath is not null) File.AppendAllText(metricsPath, MetricsLine(status.RunId, e) + "\n");
        }
        if (_terminal && status.State == RunState.Running && status.StepsPerEpoch > 0 && status.Spec is { } spec)
        {
            const int width = 30;
            int filled = (int)((long)width * status.StepInEpoch / status.StepsPerEpoch);
            output.Write($"\r  epoch {status.Epoch + 1}/{spec.Epochs} [{new string('#', filled)}{new string('.', width - filled)}] step {status.StepInEpoch}/{status.StepsPerEpoch}   ");
            _barShown = true;
        }
        if (status.IsFinished) ClearBar();
    }

    private void ClearBar()
    {
        if (!_barShown) return;
        output.Write("\r" + new string(' ', 79) + "\r");
        _barShown = false;
    }

    public static string MetricsLine(string runId, EpochResult e) => JsonSerializer.Serialize(new
    {
        runId,
        epoch = e.Epoch,
        trainLoss = e.TrainLoss,
        testLoss = e.TestLoss,
        testAccuracy = e.TestAccuracy,
        seconds = e.Seconds,
        samplesPerSecond = e.SamplesPerSecond,
        parameterSha256 = e.ParameterSha256,
        steps = e.Steps,
    });

    public static void PrintStatus(TextWriter output, RunStatus status)
    {
        output.WriteLine($"run {status.RunId}: {status.State.ToString().ToLowerInvariant()}");
        if (status.Spec is { } spec) output.WriteLine($"  {Describe(spec)}");
        if (status.State == RunState.Running)
            output.WriteLine($"  epoch {status.Epoch + 1}, step {status.StepInEpoch}/{status.StepsPerEpoch}");
        output.WriteLine($"  coordinator and parameter server on {status.CoordinatorSilo}");
        if (status.WorkerSilos.Length > 0) output.WriteLine($"  workers on {status.WorkerSilos.Length} silo(s): {string.Join(", ", status.WorkerSilos)}");
        if (status.Error is not null) output.WriteLine($"  error: {status.Error}");
        if (status.Epochs.Length > 0)
        {
            var reporter = new RunReporter(output, null);
            reporter.Header();
            reporter.Report(status with { State = RunState.Completed });
        }
    }
}
