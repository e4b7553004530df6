using System.CommandLine;
using Backprop.Grains;
using Backprop.Grains.Messages;

namespace Backprop.Client;

/// <summary>plot: the learning curves of one or more runs in one PNG, from metrics files or from the runs' stored epochs.</summary>
public static class PlotCommand
{
    public static Command Create()
    {
        var sources = new Argument<string[]>("source")
        {
            Description = "A --metrics-out JSON-lines file, or the id of a run in the cluster given (or stored under --data-dir); several are drawn in one figure",
            Arity = ArgumentArity.OneOrMore,
        };
        var output = new Option<string>("--out") { Description = "PNG file to write", Required = true };
        var store = new RunStoreOptions();
        var command = new Command("plot",
            $"Draw learning curves as a {Figures.CurvesWidth}x{Figures.CurvesHeight} PNG: train and test loss, test accuracy and samples/s per epoch, one colour per run")
        {
            sources, output,
        };
        store.AddTo(command);
        command.SetAction((parse, cancel) => Cli.Guard(async () =>
        {
            string[] given = parse.GetValue(sources)!;
            // Files first: a bad one fails before a cluster is reached.
            var files = given.Where(IsFile).Distinct().ToDictionary(f => f, MetricsFile.Read);
            string[] runIds = [.. given.Where(s => !files.ContainsKey(s)).Distinct()];
            var stored = runIds.Length > 0 ? await FromStore(parse, store, runIds, cancel) : [];
            // In the order given: the legend's colours follow the command line.
            var runs = Distinct([.. given.SelectMany(s => files.TryGetValue(s, out var inFile) ? inFile : [stored[s]])]);
            Figures.Curves(runs, parse.GetValue(output)!, "--out");
            Console.WriteLine($"{runs.Count} run{(runs.Count == 1 ? "" : "s")} drawn in {parse.GetValue(output)}");
            return ExitCodes.Ok;
        }));
        return command;
    }

    /// <summary>A file when there is one, or when the name cannot be a run id (a path, a .jsonl/.json name): then a missing file is said so.</summary>
    private static bool IsFile(string source) =>
        File.Exists(source) || source.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase) || source.EndsWith(".json", StringComparison.OrdinalIgnoreCase) || !IsRunId(source);

    private static bool IsRunId(string source)
    {
        try { Backprop.Core.RunIds.Validate(source); return true; } catch (ArgumentException) { return false; }
    }

    private static async Task<Dictionary<string, RunCurves>> FromStore(ParseResult parse, RunStoreOptions store, string[] runIds, CancellationToken cancel)
    {
        string stored = ClusterConnection.StateDirectory(parse.GetValue(store.DataDir)!);
        if (store.Address.Parse(parse, fallbackGateway: null) is null && !Directory.Exists(stored))
            throw new ArgumentException($"{runIds[0]}: no such file; for a run, give --gateway or --redis, or the --data-dir whose runs/ holds it (no {stored})");
        await using var cluster = await store.Open(parse, threads: 1, cancel);
        var runs = new Dictionary<string, RunCurves>();
        foreach (string runId in runIds)
        {
            var status = await cluster.Client.GetGrain<IRunGrain>(runId).GetStatus();
            if (status.State == RunState.NotStarted) throw new ArgumentException($"{runId}: no such file, and no run '{runId}' in {cluster.Description}");
            if (status.Epochs.Length == 0) throw new ArgumentException($"run {runId}: no epochs yet ({status.State.ToString().ToLowerInvariant()})");
            runs[runId] = new RunCurves(runId, [.. status.Epochs.Select(EpochPoint.Of)]);
        }
        return runs;
    }

    /// <summary>Runs of the same name (one run's metrics file given twice, or beside its id) keep one legend entry each: numbered.</summary>
    private static List<RunCurves> Distinct(List<RunCurves> runs)
    {
        var seen = new Dictionary<string, int>();
        var distinct = new List<RunCurves>();
        foreach (var run in runs)
        {
            int n = seen[run.Label] = seen.GetValueOrDefault(run.Label) + 1;
            distinct.Add(n == 1 ? run : run with { Label = $"{run.Label} ({n})" });
        }
        return distinct;
    }
}
