using System.CommandLine;
using System.Globalization;
using Backprop.Grains;
using Backprop.Grains.Messages;

namespace Backprop.Client;

/// <summary>
/// resume and runs: commands on stored runs. With a gateway they act on that cluster; without one, on the
/// runs the embedded silo stored under the data directory (an interrupted `train` without a gateway).
/// </summary>
public static class StoredRunCommands
{
    public static Command Resume()
    {
        var run = Cli.RunArgument();
        var store = new RunStoreOptions();
        var threads = new Option<int?>("--threads-per-worker") { Description = "Embedded only: threads each worker uses for a chunk [default: 1]" };
        var follow = new FollowOptions();
        var command = new Command("resume", "Continue a stored run (interrupted, cancelled, or stopped with the whole cluster) from its last checkpoint, and follow it") { run };
        store.AddTo(command);
        command.Add(threads);
        follow.AddTo(command);
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            int threadCount = parse.GetValue(threads) is { } t ? Cli.CheckThreadsPerWorker(t) : 1;
            // Without a cluster this process becomes the run's coordinator: only if no other process is.
            using var runLock = store.IsEmbedded(parse) ? RunLock.Take(ClusterConnection.StateDirectory(parse.GetValue(store.DataDir)!), parse.GetValue(run)!) : null;
            await using var cluster = await store.Open(parse, threadCount, cancel);
            var grain = cluster.Client.GetGrain<IRunGrain>(parse.GetValue(run)!);
            var before = await grain.GetStatus();
            if (before.State == RunState.NotStarted) throw new ArgumentException($"no run '{before.RunId}' in {cluster.Description}");
            var status = await grain.Resume();
            Console.WriteLine(status.IsFinished
                ? $"run {status.RunId} is already {status.State.ToString().ToLowerInvariant()} ({status.EpochsDone} of {status.Spec!.Epochs} epochs)"
                : $"run {status.RunId} resumed on {cluster.Description} ({status.EpochsDone} of {status.Spec!.Epochs} epochs done)");
            Console.WriteLine($"  {RunReporter.Describe(status.Spec)}");
            // Epochs finished before the resume are shown, but written to the metrics file only by the command that saw them end.
            return await follow.FollowAndSave(parse, cluster, grain, cancel, metricsFromEpoch: status.EpochsDone + 1);
        }));
        return command;
    }

    public static Command Runs()
    {
        var store = new RunStoreOptions();
        var command = new Command("runs", "List stored runs: state, epochs done and last test accuracy");
        store.AddTo(command);
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            await using var cluster = await store.Open(parse, threads: 1, cancel);
            var runs = await cluster.Client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key).List();
            if (runs.Length == 0)
            {
                Console.WriteLine($"no runs in {cluster.Description}");
                return ExitCodes.Ok;
            }
            Console.WriteLine($"{"run",-32}  {"state",-10}  {"epochs",7}  {"accuracy",8}  updated (UTC)");
            foreach (var r in runs)
            {
                string accuracy = r.LastAccuracy is { } a ? (a * 100).ToString("F2", CultureInfo.InvariantCulture) + "%" : "-";
                Console.WriteLine($"{r.RunId,-32}  {r.State.ToString().ToLowerInvariant(),-10}  {$"{r.EpochsDone}/{r.Epochs}",7}  {accuracy,8}  {r.Updated:yyyy-MM-dd HH:mm:ss}");
            }
            return ExitCodes.Ok;
        }));
        return command;
    }
}
