using System.CommandLine;
using Backprop.Client;
using Backprop.Core;
using Backprop.Core.Data;

var root = new RootCommand("Backprop.Distributed: data-parallel backprop training on an Orleans cluster")
{
    TrainCommand.Create(),
    RunCommands.Watch(),
    RunCommands.Status(),
    RunCommands.Cancel(),
    StoredRunCommands.Resume(),
    StoredRunCommands.Runs(),
    PlotCommand.Create(),
    EvalCommand.Create(),
    DataCommand.Create(),
};

var verbose = new Option<bool>("--verbose") { Description = "Show the log of Orleans and of the embedded silo on stderr", Recursive = true };
var noProgress = new Option<bool>("--no-progress")
{
    Description = "No progress line on stderr (by default redrawn in place on a terminal, else a plain line every 10 s); the epoch table is unchanged",
    Recursive = true,
};
root.Add(verbose);
root.Add(noProgress);
var parsed = root.Parse(args);
ClusterConnection.Verbose = parsed.GetValue(verbose);
RunReporter.NoProgress = parsed.GetValue(noProgress);
if (parsed.Errors.Count > 0)
{
    Console.Error.WriteLine($"error: {Cli.OneLine(parsed.Errors[0].Message)} (see --help)");
    return ExitCodes.Usage;
}
// Ctrl+C (SIGINT) and SIGTERM cancel the command's token: a run on the embedded silo is stopped at a step
// boundary and checkpointed (`resume` continues it), a cluster run is detached from. The handlers cancel the
// process's default exit so that the command can finish that work.
using var interrupt = new CancellationTokenSource();
using var onInt = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGINT, Interrupt);
using var onTerm = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, Interrupt);
return await parsed.InvokeAsync(new InvocationConfiguration { ProcessTerminationTimeout = null }, interrupt.Token);

void Interrupt(System.Runtime.InteropServices.PosixSignalContext context)
{
    // The second signal is not cancelled: the process ends at once.
    context.Cancel = !interrupt.IsCancellationRequested;
    interrupt.Cancel();
}

namespace Backprop.Client
{
    /// <summary>Options several commands share, and the error handling every command goes through.</summary>
    public static class Cli
    {
        public static Option<string> DataDir() => new("--data-dir")
        {
            Description = "Data directory holding <dataset>/<IDX files> [env BACKPROP_DATA]",
            DefaultValueFactory = _ => DatasetCatalog.DefaultDataDir(),
        };

        public static Option<string> Dataset(string? fallback = "mnist")
        {
            var option = new Option<string>("--dataset")
            {
                Description = "Dataset: " + string.Join(" | ", DatasetCatalog.Names)
                    + " | the path of a folder of your own (the four IDX files, or train.csv and test.csv; on a cluster, the same path on every silo)",
            };
            if (fallback is not null) option.DefaultValueFactory = _ => fallback;
            return option;
        }

        /// <summary>The argument of the commands on one run.</summary>
        public static Argument<string> RunArgument() => new("run") { Description = "Run id (printed by train)" };

        /// <summary>Returns <paramref name="threads"/> when a worker may use that many threads, else throws naming --threads-per-worker.</summary>
        public static int CheckThreadsPerWorker(int threads) => threads is >= 1 and <= ResourceLimits.MaxThreadsPerWorker
            ? threads
            : throw new ArgumentException($"--threads-per-worker: {threads} is outside 1..{ResourceLimits.MaxThreadsPerWorker}");

        /// <summary>The parser's message on one line, with .NET type names put in words.</summary>
        public static string OneLine(string message)
        {
            var m = System.Text.RegularExpressions.Regex.Match(message, @"^Cannot parse argument '(.*)' for option '(.*)' as expected type '(.*)'\.$");
            if (m.Success)
            {
                string type = m.Groups[3].Value;
                string kind = type.Contains("Int") ? "an integer" : type.Contains("Single") || type.Contains("Double") ? "a number" : "valid";
                return $"{m.Groups[2].Value}: '{m.Groups[1].Value}' is not {kind}";
            }
            return System.Text.RegularExpressions.Regex.Replace(message, @"\s*\n\s*", " ");
        }

        /// <summary>Runs a command body, turning expected failures into one-line messages and exit codes.</summary>
        public static async Task<int> Guard(Func<Task<int>> body)
        {
            try
            {
                return await body();
            }
            catch (Exception e) when (e is ArgumentException or DataFileException or InvalidDataException or FileNotFoundException)
            {
                Console.Error.WriteLine($"error: {e.Message}");
                return ExitCodes.Usage;
            }
            catch (OperationCanceledException)
            {
                Console.Error.WriteLine("interrupted");
                return ExitCodes.Interrupted;
            }
            catch (Exception e) when (e is ClusterUnreachableException or InvalidOperationException or IOException or Orleans.Runtime.OrleansException or TimeoutException)
            {
                Console.Error.WriteLine($"error: {e.Message}");
                return ExitCodes.Error;
            }
        }
    }
}
