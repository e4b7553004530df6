using System.CommandLine;
using System.Globalization;
using Backprop.Core;
using Backprop.Grains;
using Backprop.Grains.Messages;

namespace Backprop.Client;

/// <summary>
/// What the commands that follow a run (train, watch, resume) write besides the epoch table: --metrics-out and
/// --model-out, and the following itself: epochs as they end, the model saved when the run completes, the exit code.
/// </summary>
public sealed class FollowOptions
{
    public Option<string?> MetricsOut { get; } = new("--metrics-out") { Description = "Append one JSON line per epoch to this file" };

    public Option<string?> ModelOut { get; } = new("--model-out") { Description = "Save the trained model to this file when the run completes" };

    public void AddTo(Command command)
    {
        command.Add(MetricsOut);
        command.Add(ModelOut);
    }

    /// <summary>
    /// Prints the epoch table and follows <paramref name="run"/> to its end; saves the model of a completed run; returns
    /// the exit code of its final state. Ctrl+C stops a run of the embedded silo at a step boundary with a checkpoint,
    /// and detaches from a cluster's run (which goes on). The metrics file gets the epochs from
    /// <paramref name="metricsFromEpoch"/> on: only the command that saw an epoch end writes it.
    /// </summary>
    public async Task<int> FollowAndSave(ParseResult parse, ClusterConnection cluster, IRunGrain run, CancellationToken cancel, int metricsFromEpoch = 1)
    {
        var reporter = new RunReporter(Console.Out, parse.GetValue(MetricsOut), metricsFromEpoch);
        reporter.Header((await run.GetStatus()).Spec?.Validation > 0);
        RunStatus status;
        try
        {
            status = await reporter.Follow(run, cancel);
        }
        catch (OperationCanceledException) when (cancel.IsCancellationRequested)
        {
            string runId = run.GetPrimaryKeyString();
            if (cluster.IsEmbedded)
            {
                var stopped = await StopEmbedded(run);
                reporter.Report(stopped);   // epochs that ended while it stopped
                Console.Error.WriteLine($"interrupted: run {runId} stopped in epoch {stopped.Epoch + 1}; continue it with: {cluster.HowToContinue(runId)}");
            }
            else
            {
                Console.Error.WriteLine($"detached; run {runId} goes on. Re-attach: {cluster.HowToContinue(runId)}");
            }
            return ExitCodes.Interrupted;
        }
        if (status.State == RunState.Completed && parse.GetValue(ModelOut) is { } path) await SaveModel(run, status, path);
        return ExitCodeOf(status);
    }

    /// <summary>
    /// Cancels a run of the embedded silo and waits until its loop has stopped and stored its checkpoint:
    /// the silo goes away with this process right after.
    /// </summary>
    private static async Task<RunStatus> StopEmbedded(IRunGrain run)
    {
        var status = await run.Cancel();
        for (int i = 0; i < 3 && !status.IsFinished; i++) status = await run.WaitForFinish(TimeSpan.FromSeconds(10));
        return status;
    }

    /// <summary>Saves a completed run's parameters as a model file, with where they came from.</summary>
    private static async Task SaveModel(IRunGrain run, RunStatus status, string path)
    {
        var model = await run.GetModel();
        // The epoch the parameters are from: the last one, or with --keep best the best one by validation accuracy.
        var epochs = (await run.GetStatus()).Epochs;
        var last = epochs.LastOrDefault(e => e.Steps == model.Step) ?? epochs[^1];
        ModelFile.Save(path, model.Spec.Model, model.Parameters.Span, new Dictionary<string, string>
        {
            ["dataset"] = model.Spec.Dataset,
            ["runId"] = status.RunId,
            ["epochs"] = last.Epoch.ToString(CultureInfo.InvariantCulture),
            ["testAccuracy"] = last.TestAccuracy.ToString("R", CultureInfo.InvariantCulture),
            ["parameterSha256"] = last.ParameterSha256,
        });
        Console.WriteLine($"model saved to {path}{(model.Spec.KeepBest ? $" (epoch {last.Epoch}, the best by validation accuracy)" : "")}");
    }

    private static int ExitCodeOf(RunStatus status) => status.State switch
    {
        RunState.Completed => ExitCodes.Ok,
        RunState.Cancelled => ExitCodes.RunCancelled,
        _ => Fail(status),
    };

    private static int Fail(RunStatus status)
    {
        Console.Error.WriteLine($"run {status.RunId} {status.State.ToString().ToLowerInvariant()}: {status.Error}");
        return ExitCodes.RunFailed;
    }
}
