using System.CommandLine;
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
        command.Add(metrics);
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            await using var cluster = await Connect(parse, address, cancel);
            var grain = cluster.Client.GetGrain<IRunGrain>(parse.GetValue(run)!);
            var status = await grain.GetStatus();
            if (status.State == RunState.NotStarted) throw new ArgumentException($"no run '{status.RunId}' in {cluster.Description}");
            if (status.Spec is { } spec) Console.WriteLine($"run {status.RunId}: {RunReporter.Describe(spec)}");
            var reporter = new RunReporter(Console.Out, parse.GetValue(metrics));
            reporter.Header();
            return ExitCodeOf(await reporter.Follow(grain, cancel));
        }));
        return command;
    }

    public static Command Status()
    {
        var (command, run, address) = Make("status", "Print a run's state, progress and finished epochs");
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            await using var cluster = await Connect(parse, address, cancel);
            var status = await cluster.Client.GetGrain<IRunGrain>(parse.GetValue(run)!).GetStatus();
            if (status.State == RunState.NotStarted) throw new ArgumentException($"no run '{status.RunId}' in {cluster.Description}");
            RunReporter.PrintStatus(Console.Out, status);
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
        return (new Command(name, description) { run, address.Gateway, address.Redis, address.ClusterId }, run, address);
    }

    private static Task<ClusterConnection> Connect(ParseResult parse, ClusterAddressOptions address, CancellationToken cancel) =>
        ClusterConnection.Connect(address.Parse(parse, ClusterAddress.DefaultGateway)!, cancel);
}
