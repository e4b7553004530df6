using System.CommandLine;
using System.Globalization;
using Backprop.Core;
using Backprop.Grains;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;

namespace Backprop.Client;

/// <summary>watch, status and cancel: commands on a run that lives in a running cluster.</summary>
public static class RunCommands
{
    public static Command Watch()
    {
        var (command, run, address) = Make("watch", "Attach to a run: print its epochs so far, then follow it to the end");
        var metrics = new Option<string?>("--metrics-out") { Description = "Append one JSON line per epoch to this file" };
        var modelOut = new Option<string?>("--model-out") { Description = "Save the trained model to this file when the run completes" };
        command.Add(metrics);
        command.Add(modelOut);
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            await using var cluster = await Connect(parse, address, cancel);
            var grain = cluster.Client.GetGrain<IRunGrain>(parse.GetValue(run)!);
            var status = await grain.GetStatus();
            if (status.State == RunState.NotStarted) throw new ArgumentException($"no run '{status.RunId}' in {cluster.Description}");
            if (status.Spec is { } spec) Console.WriteLine($"run {status.RunId}: {RunReporter.Describe(spec)}");
            var reporter = new RunReporter(Console.Out, parse.GetValue(metrics));
            reporter.Header(status.Spec?.Validation > 0);
            var final = await reporter.Follow(grain, cancel);
            if (final.State == RunState.Completed && parse.GetValue(modelOut) is { } path) await SaveModel(grain, final, path);
            return ExitCodeOf(final);
        }));
        return command;
    }

    /// <summary>Saves a completed run's parameters as a model file, with where they came from.</summary>
    public static async Task SaveModel(IRunGrain run, RunStatus status, string path)
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

    public static Command Status()
    {
        var (command, run, address) = Make("status", "Print a run's state, progress, where its grains run, finished epochs and latest events");
        var json = new Option<bool>("--json") { Description = "Print one JSON object (runId, state, epoch, step, stepsPerEpoch, silos, epochs, events)" };
        command.Add(json);
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            await using var cluster = await Connect(parse, address, cancel);
            var status = await cluster.Client.GetGrain<IRunGrain>(parse.GetValue(run)!).GetStatus();
            if (status.State == RunState.NotStarted) throw new ArgumentException($"no run '{status.RunId}' in {cluster.Description}");
            if (parse.GetValue(json)) Console.WriteLine(RunReporter.StatusJson(status));
            else RunReporter.PrintStatus(Console.Out, status);
            return ExitCodes.Ok;
        }));
        return command;
    }

    public static Command Cancel()
    {
        var (command, run, address) = Make("cancel", "Cancel a run; it stops before its next step");
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            await using var cluster = await Connect(parse, address, cancel);
            var grain = cluster.Client.GetGrain<IRunGrain>(parse.GetValue(run)!);
            var status = await grain.GetStatus();
            if (status.State == RunState.NotStarted) throw new ArgumentException($"no run '{status.RunId}' in {cluster.Description}");
            await grain.Cancel();
            status = await grain.WaitForFinish(TimeSpan.FromSeconds(10));
            Console.WriteLine($"run {status.RunId}: {status.State.ToString().ToLowerInvariant()}");
            return ExitCodes.Ok;
        }));
        return command;
    }

    /// <summary>
    /// Cancels a run of the embedded silo and waits until its loop has stopped and stored its checkpoint:
    /// the silo goes away with this process right after.
    /// </summary>
    public static async Task<RunStatus> StopEmbedded(IRunGrain run)
    {
        var status = await run.Cancel();
        for (int i = 0; i < 3 && !status.IsFinished; i++) status = await run.WaitForFinish(TimeSpan.FromSeconds(10));
        return status;
    }

    public static int ExitCodeOf(RunStatus status) => status.State switch
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

    private static (Command, Argument<string>, ClusterAddressOptions) Make(string name, string description)
    {
        var run = new Argument<string>("run") { Description = "Run id (printed by train)" };
        var address = new ClusterAddressOptions($"Gateways of the running cluster [default {ClusterAddress.DefaultGateway}]");
        return (new Command(name, description) { run, address.Gateway, address.Redis, address.RedisPasswordFile, address.ClusterId, address.TlsCert, address.TlsKey, address.TlsCa, address.TlsPeerName, address.RedisTls, address.RedisCa, address.ConnectTimeout }, run, address);
    }

    private static Task<ClusterConnection> Connect(ParseResult parse, ClusterAddressOptions address, CancellationToken cancel) =>
        ClusterConnection.Connect(address.Parse(parse, ClusterAddress.DefaultGateway)!, cancel);
}
