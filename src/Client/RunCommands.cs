using System.CommandLine;
using Backprop.Grains;
using Backprop.Grains.Messages;

namespace Backprop.Client;

/// <summary>watch, status and cancel: commands on a run that lives in a running cluster.</summary>
public static class RunCommands
{
    public static Command Watch()
    {
        var (command, run, address) = Make("watch", "Attach to a run: print its epochs so far, then follow it to the end");
        var follow = new FollowOptions();
        follow.AddTo(command);
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            await using var cluster = await Connect(parse, address, cancel);
            var grain = cluster.Client.GetGrain<IRunGrain>(parse.GetValue(run)!);
            var status = await grain.GetStatus();
            if (status.State == RunState.NotStarted) throw new ArgumentException($"no run '{status.RunId}' in {cluster.Description}");
            if (status.Spec is { } spec) Console.WriteLine($"run {status.RunId}: {RunReporter.Describe(spec)}");
            return await follow.FollowAndSave(parse, cluster, grain, cancel);
        }));
        return command;
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

    private static (Command, Argument<string>, ClusterAddressOptions) Make(string name, string description)
    {
        var run = Cli.RunArgument();
        var address = new ClusterAddressOptions($"Gateways of the running cluster [default {ClusterAddress.DefaultGateway}]");
        var command = new Command(name, description) { run };
        address.AddTo(command);
        return (command, run, address);
    }

    private static Task<ClusterConnection> Connect(ParseResult parse, ClusterAddressOptions address, CancellationToken cancel) =>
        ClusterConnection.Connect(address.Parse(parse, ClusterAddress.DefaultGateway)!, cancel);
}
