using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Messages;

namespace Backprop.Client;

/// <summary>
/// Follows a run: one table row per finished epoch on stdout, optionally one JSON line per epoch to a metrics file,
/// and on stderr the progress within the run (<see cref="ProgressLine"/>): a line redrawn in place when stderr is a
/// terminal, else a plain line every <see cref="PlainEvery"/>; none with <see cref="NoProgress"/> (--no-progress).
/// </summary>
public sealed class RunReporter(TextWriter output, string? metricsPath, int metricsFromEpoch = 1)
{
    private static readonly CultureInfo Inv = CultureInfo.InvariantCulture;
    private static readonly TimeSpan PlainEvery = TimeSpan.FromSeconds(10);
    /// <summary>Set from the command line (--no-progress, any command).</summary>
    public static bool NoProgress { get; set; }
    private readonly bool _terminal = !Console.IsErrorRedirected;
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private readonly ProgressLine _progress = new(StartClock());
    // The first plain line after PlainEvery too: a short run prints none.
    private TimeSpan _lastPlain = TimeSpan.Zero;
    private int _printed;
    private bool _barShown;

    // The project builds with invariant globalization, so plain interpolation formats numbers invariantly.
    public static string Describe(RunSpec s) =>
        $"{s.Model.Describe()}, init {s.Init.ToString().ToLowerInvariant()}; {s.Optimizer.Kind.ToString().ToLowerInvariant()} lr {s.Optimizer.LearningRate}" +
        OptimizerDetails(s.Optimizer) +
        $"; batch {s.BatchSize}, chunk {s.ChunkSize}; {s.Workers} worker{(s.Workers == 1 ? "" : "s")}; {s.Epochs} epochs; dataset {s.Dataset}" +
        (s.TrainLimit > 0 ? $" (first {s.TrainLimit} training images)" : "") +
        (s.Validation > 0 ? $"; {s.Validation} training images held out for validation ({(s.ValidationLast ? "the last ones, as an earlier version stored the run" : "drawn from the seed")})" : "") +
        (s.EarlyStop > 0 ? $"; early stop after {s.EarlyStop} epochs without improvement" : "") +
        (s.KeepBest ? "; keeps the best epoch" : "") + (s.Augment != RunSpec.NoAugment ? $"; augment {s.Augment}" : "") + (s.ClipNorm > 0 ? $"; clip-norm {s.ClipNorm:R}" : "") + $"; seed {s.Seed}";

    private static string OptimizerDetails(OptimizerSettings o) =>
        (o.Kind is OptimizerKind.Momentum or OptimizerKind.Nesterov ? $" momentum {o.Momentum}" : "") +
        (o.Kind is OptimizerKind.Adam or OptimizerKind.AdamW ? $" betas {o.Beta1}/{o.Beta2} eps {o.Eps}" : "") +
        (o.WeightDecay != 0 ? $" weight decay {o.WeightDecay}" : "") +
        o.Schedule switch
        {
            ScheduleKind.Step => $", x{o.LrGamma} every {o.LrStepEpochs} epochs",
            ScheduleKind.Cosine => $", cosine to {o.LrEnd}",
            ScheduleKind.OneCycle => $", one-cycle to {o.LrEnd}" + (o.RoundedOneCycle ? " (its phase end rounded, as an earlier version stored the run)" : ""),
            _ => "",
        } +
        (o.WarmupSteps > 0 ? $", warm-up {o.WarmupSteps} steps" : "");

    /// <summary>The table's header; <paramref name="validation"/>: with the validation columns (--validation).</summary>
    public void Header(bool validation = false) =>
        output.WriteLine($"{"epoch",5}  {"train loss",10}  {"test loss",9}  {"test acc",8}  {"seconds",7}  {"samples/s",9}  {"lr",9}" + (validation ? $"  {"val loss",8}  {"val acc",8}" : ""));

    /// <summary>How long the reporter keeps trying to reach a run it lost contact with before it gives up.</summary>
    public static readonly TimeSpan GiveUpAfter = TimeSpan.FromSeconds(60);
    private static readonly TimeSpan CallLimit = TimeSpan.FromSeconds(5);

    /// <summary>
    /// Shows progress until the run finishes; returns its final status. Asks only for epochs it has not
    /// printed. When the cluster cannot be reached (a gateway or the coordinator's silo died) it says so in
    /// one line and tries again with back-off: the client moves to another gateway, and the run to another silo.
    /// </summary>
    public async Task<RunStatus> Follow(IRunGrain run, CancellationToken cancel)
    {
        if (metricsPath is not null && Path.GetDirectoryName(Path.GetFullPath(metricsPath)) is { } dir) Directory.CreateDirectory(dir);
        Stopwatch? lost = null;
        for (int attempt = 0; ; )
        {
            cancel.ThrowIfCancellationRequested();
            RunStatus status;
            try
            {
                // The wait returns early when the run ends, and otherwise paces the progress display.
                // Bounded here: a call in flight through a gateway that dies is not failed until the response timeout.
                status = await run.WaitForFinish(TimeSpan.FromMilliseconds(300), _printed).WaitAsync(CallLimit, cancel);
            }
            catch (Exception e) when (e is not (ArgumentException or OperationCanceledException) && (lost ??= Stopwatch.StartNew()).Elapsed < GiveUpAfter)
            {
                if (attempt++ == 0)
                {
                    ClearBar();
                    Console.Error.WriteLine($"lost contact with run {runIdOf(run)} ({OneLine(e.Message)}); retrying for up to {GiveUpAfter.TotalSeconds:F0} s");
                }
                await Task.Delay(TimeSpan.FromMilliseconds(Math.Min(4000, 250 << Math.Min(attempt, 4))), cancel);
                continue;
            }
            if (lost is not null)
            {
                Console.Error.WriteLine($"back in contact with run {status.RunId} after {lost.Elapsed.TotalSeconds:F1} s");
                (lost, attempt) = (null, 0);
            }
            if (status.State == RunState.NotStarted)
                throw new InvalidOperationException($"run {status.RunId} no longer exists in the cluster (its stored state is gone)");
            Report(status);
            if (status.IsFinished)
            {
                if (status.State == RunState.Completed && status.Events.LastOrDefault(e => e.Kind == "early-stop") is { } stop)
                    output.WriteLine($"early stop: {stop.Message}");
                return status;
            }
        }

        static string runIdOf(IRunGrain run) => run.GetPrimaryKeyString();
    }

    private static string OneLine(string message) => message.Split('\n', 2)[0].Trim();

    public void Report(RunStatus status)
    {
        foreach (var e in status.Epochs)
        {
            if (e.Epoch <= _printed) continue;
            ClearBar();
            _printed = e.Epoch;
            string validation = e.ValidationAccuracy is { } v ? string.Create(Inv, $"  {e.ValidationLoss,8:F4}  {v * 100,7:F2}%") : "";
            output.WriteLine(string.Create(Inv,
                $"{e.Epoch,5}  {e.TrainLoss,10:F4}  {e.TestLoss,9:F4}  {e.TestAccuracy * 100,7:F2}%  {e.Seconds,7:F1}  {e.SamplesPerSecond,9:F0}  {LearningRate(status.Spec, e),9:G4}{validation}"));
            if (metricsPath is not null && e.Epoch >= metricsFromEpoch) File.AppendAllText(metricsPath, MetricsLine(status.RunId, e, LearningRate(status.Spec, e)) + "\n");
        }
        if (!NoProgress && _progress.Update(status) is { } line)
        {
            if (_terminal)
            {
                // Cut to the terminal's width (read each time: it may have been resized), so that \r redraws one line.
                int width = Math.Max(20, ConsoleWidth() - 1);
                Console.Error.Write("\r" + (line.Length > width ? line[..width] : line.PadRight(width)));
                _barShown = true;
            }
            else if (_clock.Elapsed - _lastPlain >= PlainEvery)
            {
                Console.Error.WriteLine(line);
                _lastPlain = _clock.Elapsed;
            }
        }
        if (status.IsFinished) ClearBar();
    }

    private static Func<TimeSpan> StartClock()
    {
        var clock = Stopwatch.StartNew();
        return () => clock.Elapsed;
    }

    private static int ConsoleWidth()
    {
        try
        {
            return Console.WindowWidth > 0 ? Console.WindowWidth : 80;
        }
        catch (IOException)
        {
            return 80;
        }
    }

    private void ClearBar()
    {
        if (!_barShown) return;
        Console.Error.Write("\r" + new string(' ', Math.Max(20, ConsoleWidth() - 1)) + "\r");
        _barShown = false;
    }

    /// <summary>The rate of the epoch's first step (a schedule changes it within the epoch); none without the spec.</summary>
    private static double? LearningRate(RunSpec? spec, EpochResult e) => spec?.EpochLearningRate(e.Epoch);

    public static string MetricsLine(string runId, EpochResult e, double? lr) => JsonSerializer.Serialize(Metrics(runId, e, lr));

    private static object Metrics(string runId, EpochResult e, double? lr) => new
    {
        runId,
        epoch = e.Epoch,
        lr,
        trainLoss = e.TrainLoss,
        testLoss = e.TestLoss,
        testAccuracy = e.TestAccuracy,
        seconds = e.Seconds,
        samplesPerSecond = e.SamplesPerSecond,
        parameterSha256 = e.ParameterSha256,
        steps = e.Steps,
        validationLoss = e.ValidationLoss,
        validationAccuracy = e.ValidationAccuracy,
        profile = e.Profile is { } p ? new
        {
            steps = p.Steps,
            trainSeconds = p.TrainSeconds,
            slowestComputeSeconds = p.SlowestComputeSeconds,
            fastestComputeSeconds = p.FastestComputeSeconds,
            transferSeconds = p.TransferSeconds,
            reduceAndStepSeconds = p.ReduceAndStepSeconds,
            serverCallSeconds = p.ServerCallSeconds,
            barrierWaitSeconds = p.BarrierWaitSeconds,
            wireBytesPerStep = p.WireBytesPerStep,
            allocatedBytesPerStep = p.AllocatedBytesPerStep,
            workerCalls = p.WorkerCalls,
        } : null,
    };

    /// <summary>`status --json`: one object with the run's position, where its grains are, its epochs and its event log.</summary>
    public static string StatusJson(RunStatus status) => JsonSerializer.Serialize(new
    {
        runId = status.RunId,
        state = status.State.ToString().ToLowerInvariant(),
        epoch = status.State == RunState.Running ? status.Epoch + 1 : status.EpochsDone,
        step = status.Step,
        stepsPerEpoch = status.StepsPerEpoch,
        epochs = status.Epochs.Select(e => Metrics(status.RunId, e, LearningRate(status.Spec, e))).ToArray(),
        coordinatorSilo = status.CoordinatorSilo,
        shardSilos = status.ShardSilos,
        workerSilos = status.WorkerSilos,
        error = status.Error,
        workers = status.Workers.Select(w => new
        {
            id = w.Worker,
            silo = w.Silo,
            blocks = w.Blocks,
            computeMedianSeconds = w.ComputeMedianSeconds,
            computeP95Seconds = w.ComputeP95Seconds,
            straggler = w.Straggler,
        }).ToArray(),
        events = status.Events.Select(e => new { time = e.Time, kind = e.Kind, message = e.Message }).ToArray(),
    });

    public static void PrintStatus(TextWriter output, RunStatus status)
    {
        output.WriteLine($"run {status.RunId}: {status.State.ToString().ToLowerInvariant()}");
        if (status.Spec is { } spec) output.WriteLine($"  {Describe(spec)}");
        if (status.State == RunState.Running)
            output.WriteLine($"  epoch {status.Epoch + 1}, step {status.StepInEpoch}/{status.StepsPerEpoch}");
        output.WriteLine($"  coordinator on {status.CoordinatorSilo}, parameter server shards on {(status.ShardSilos.Length > 0 ? string.Join(", ", status.ShardSilos) : "(not attached)")}");
        if (status.WorkerSilos.Length > 0) output.WriteLine($"  workers on {status.WorkerSilos.Length} silo(s): {string.Join(", ", status.WorkerSilos)}");
        if (status.Error is not null) output.WriteLine($"  error: {status.Error}");
        if (status.Workers.Length > 0)
        {
            output.WriteLine($"  compute per step over the last {WorkerStats.Steps} steps:");
            output.WriteLine($"    {"worker",6}  {"silo",-21}  {"blocks",8}  {"median ms",9}  {"p95 ms",8}");
            foreach (var w in status.Workers)
                output.WriteLine($"    {w.Worker,6}  {w.Silo,-21}  {w.Blocks,8}  {WorkerStats.Milliseconds(w.ComputeMedianSeconds),9}  {WorkerStats.Milliseconds(w.ComputeP95Seconds),8}{(w.Straggler ? "  straggler" : "")}");
            foreach (var w in status.Workers.Where(w => w.Straggler)) output.WriteLine($"  {w.Slower(status.Workers)}");
        }
        if (status.Events.Length > 0)
        {
            output.WriteLine($"  events ({Math.Min(10, status.Events.Length)} latest of {status.Events.Length}):");
            foreach (var e in status.Events.TakeLast(10)) output.WriteLine($"    {e.Time:yyyy-MM-dd HH:mm:ss.fff}  {e.Kind,-13} {e.Message}");
        }
        if (status.Epochs.Length > 0)
        {
            var reporter = new RunReporter(output, null);
            reporter.Header(status.Spec?.Validation > 0);
            reporter.Report(status with { State = RunState.Completed });
        }
    }
}
