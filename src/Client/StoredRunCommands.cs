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
        var run = new Argument<string>("run") { Description = "Run id (printed by train)" };
        var (address, dataDir) = Options();
        var threads = new Option<int?>("--threads-per-worker") { Description = "Embedded only: threads each worker uses for a chunk [default: 1]" };
        var metrics = new Option<string?>("--metrics-out") { Description = "Append one JSON line per epoch to this file" };
        var modelOut = new Option<string?>("--model-out") { Description = "Save the trained model to this file when the run completes" };
        var command = new Command("resume", "Continue a stored run (interrupted, cancelled, or stopped with the whole cluster) from its last checkpoint, and follow it")
        {
            run, address.Gateway, address.Redis, address.RedisPasswordFile, address.ClusterId, address.TlsCert, address.TlsKey, address.TlsCa, address.TlsPeerName, address.RedisTls, address.RedisCa, address.ConnectTimeout, dataDir, threads, metrics, modelOut,
        };
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            int? threadCount = parse.GetValue(threads);
            if (threadCount is < 1 or > 256) throw new ArgumentException($"--threads-per-worker: {threadCount} is outside 1..256");
            await using var cluster = await Open(parse, address, dataDir, threadCount ?? 1, cancel);
            var grain = cluster.Client.GetGrain<IRunGrain>(parse.GetValue(run)!);
            var before = await grain.GetStatus();
            if (before.State == RunState.NotStarted) throw new ArgumentException($"no run '{before.RunId}' in {cluster.Description}");
            var status = await grain.Resume();
            Console.WriteLine(status.IsFinished
                ? $"run {status.RunId} is already {status.State.ToString().ToLowerInvariant()} ({status.EpochsDone} of {status.Spec!.Epochs} epochs)"
                : $"run {status.RunId} resumed on {cluster.Description} ({status.EpochsDone} of {status.Spec!.Epochs} epochs done)");
            Console.WriteLine($"  {RunReporter.Describe(status.Spec)}");
            // Epochs finished before the resume are shown, but written to the metrics file only by the command that saw them end.
            var reporter = new RunReporter(Console.Out, parse.GetValue(metrics), metricsFromEpoch: status.EpochsDone + 1);
            reporter.Header(status.Spec.Validation > 0);
            RunStatus final;
            try
            {
                final = await reporter.Follow(grain, cancel);
            }
            catch (OperationCanceledException) when (cancel.IsCancellationRequested && cluster.IsEmbedded)
            {
                reporter.Report(await RunCommands.StopEmbedded(grain));   // epochs that ended while it stopped
                Console.Error.WriteLine($"interrupted: run {status.RunId} stopped; continue it with: resume {status.RunId} --data-dir {parse.GetValue(dataDir)}");
                return ExitCodes.Interrupted;
            }
            if (final.State == RunState.Completed && parse.GetValue(modelOut) is { } path) await RunCommands.SaveModel(grain, final, path);
            return RunCommands.ExitCodeOf(final);
        }));
        return command;
    }

    public static Command Runs()
    {
        var (address, dataDir) = Options();
        var command = new Command("runs", "List stored runs: state, epochs done and last test accuracy") { address.Gateway, address.Redis, address.RedisPasswordFile, address.ClusterId, address.TlsCert, address.TlsKey, address.TlsCa, address.TlsPeerName, address.RedisTls, address.RedisCa, address.ConnectTimeout, dataDir };
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            await using var cluster = await Open(parse, address, dataDir, threads: 1, cancel);
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

    private static (ClusterAddressOptions, Option<string>) Options() =>
        (new ClusterAddressOptions("A running cluster's gateways; without them (or --redis), the runs stored by the embedded silo under --data-dir"), Cli.DataDir());

    private static Task<ClusterConnection> Open(ParseResult parse, ClusterAddressOptions address, Option<string> dataDir, int threads, CancellationToken cancel) =>
        address.Parse(parse, fallbackGateway: null) is { } cluster
            ? ClusterConnection.Connect(cluster, cancel)
            : ClusterConnection.StartEmbedded(parse.GetValue(dataDir)!, threads, cancel);
}
