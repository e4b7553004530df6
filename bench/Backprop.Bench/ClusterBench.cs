using System.Diagnostics;
using System.Numerics;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Nodes;
using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Training;

namespace Backprop.Bench;

/// <summary>
/// `bench cluster`: one run spec (the pytorch-mlp preset, batch and model from the flags, chunk = batch/4 or --chunk) on
/// <see cref="LocalTrainer"/> in this process (core), on the CLI's embedded silo (a child process), and on a
/// local cluster of silo processes on loopback (started here with deploy/local/cluster.sh, stopped after);
/// one JSON row per mode and batch size, each against the core row of its batch size from the same invocation.
/// The cluster modes run the product as a user does (the CLI of this build, its metrics file), so nothing here
/// is a benchmark-only path. Everything started lives in a temporary folder and is stopped on exit, error or Ctrl+C.
/// </summary>
public static class ClusterBench
{
    public const string Usage = """
        usage: Backprop.Bench cluster [--json] [--epochs N] [--batch 64,256] [--model 784,128,64,10] [--workers N]
                                      [--train-limit N] [--modes core,embedded,processes] [--data-dir DIR]
                                      [--server-shards LIST] [--rounds R] [--hosts N [--link RATE]] [--chunk C]

        Trains the pytorch-mlp preset (ReLU, cross-entropy, SGD momentum 0.9, lr 0.01, seed 1) with the given batch
        sizes (chunk size = batch/4, the CLI's default, or --chunk) and model, in three modes:
          core       LocalTrainer in this process on N threads (warm-up until the JIT is quiet, then N epochs)
          embedded   the CLI's embedded silo (`backprop train`, a child process): N workers x 1 thread
          processes  N silo processes on loopback (deploy/local/cluster.sh, 1 worker thread each) and
                     `backprop train --gateway ...` with N workers
        The cluster modes train N+1 epochs; the first is warm-up and excluded. One row per mode and batch size
        (JSON lines with --json); progress goes to stderr.

          --epochs N        timed epochs of each run (default 3)
          --rounds R        runs of every mode, interleaved (core, embedded, processes, core, ...; default 2): a row has
                            the R x N timed epochs of its mode, their median and best, and ratio (median/median) and
                            ratioBest (best/best) against core
          --batch LIST      global batch sizes (default 64,256)
          --chunk C         chunk size (at most the batch): a step has batch/C chunks, so up to that many workers get a
                            block (default batch/4: 4 chunks, so more than 4 workers leave some idle)
          --model LIST      layer sizes (default 784,128,64,10; 784,1024,1024,10 is the big-model row)
          --workers N       workers = silos = core threads (default 2)
          --train-limit N   train on the first N images only (default 0 = all 60,000; for slow models)
          --modes LIST      which modes to run (default core,embedded,processes)
          --data-dir DIR    data directory holding mnist/ (default: the CLI's, ~/.cache/backprop-distributed)
          --server-shards LIST  parameter-server shard counts of the cluster modes, each run in turn (default: the worker
                            count, one per silo as the CLI does on a cluster; every row says its count, 0 for core)
          --hosts N         mode hosts (root only): N silos, each in a network namespace of its own on a bridge, every
                            link capped with tc tbf at --link each way; the CLI runs on host 0 with N workers. --hosts
                            alone runs modes core,hosts. Rows carry hosts, link, busiestLinkBytesPerStep (from the
                            shard placement: a step's pushes and next versions) and busiestLinkBytesPerStepMeasured
                            (what the busiest host sent over its link during the run, over the run's steps: evaluations
                            and membership included).
          --link RATE       link rate of mode hosts, a tc rate (default 1gbit)

        Needs MNIST (`dotnet run --project src/Client -- data fetch mnist`) and the Release build of src/Client and
        src/Silo, which `dotnet run -c Release --project bench/Backprop.Bench` builds with the bench.
        """;

    private static readonly string[] AllModes = ["core", "embedded", "processes", "hosts"];
    private const int MnistTrainCount = 60_000;

    public static async Task<int> Run(string[] args)
    {
        if (!BenchArgs.TryParse(args, "cluster", Usage, Options.Parse, out var options, out int exitCode)) return exitCode;
        var mnist = DatasetCatalog.DirectoryOf(options.DataDir, "mnist");
        if (!DatasetCatalog.IsPresent(mnist))
        {
            // The cluster loads the data set by name, so the synthetic stand-in of `core` cannot be used here.
            Console.Error.WriteLine($"error: MNIST is not in {mnist}; fetch it with: dotnet run --project src/Client -- data fetch mnist (or give --data-dir)");
            return 2;
        }

        // Ctrl+C or SIGTERM: stop the child in flight and the silos, then exit. A second signal ends the process at once.
        using var interrupt = new CancellationTokenSource();
        void OnSignal(PosixSignalContext context)
        {
            context.Cancel = !interrupt.IsCancellationRequested;
            if (context.Cancel) Console.Error.WriteLine("interrupted: stopping what the bench started");
            interrupt.Cancel();
        }
        using var onInt = PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal);
        using var onTerm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal);

        // The CLI's embedded silo stores its runs beside the data sets: a data directory of our own (MNIST linked
        // in) keeps them out of the user's, and cluster.sh's state (pids, logs) lives here too.
        string work = Directory.CreateTempSubdirectory("backprop-bench-").FullName;
        try
        {
            Directory.CreateDirectory(Path.Combine(work, "data"));
            Directory.CreateSymbolicLink(Path.Combine(work, "data", "mnist"), Path.GetFullPath(mnist));
            var bench = new Bench(options, new Paths(work), interrupt.Token);
            await bench.RunAll();
            return 0;
        }
        catch (OperationCanceledException) when (interrupt.IsCancellationRequested)
        {
            return 130;
        }
        catch (BenchException e)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return 1;
        }
        finally
        {
            try { Directory.Delete(work, recursive: true); } catch (IOException) { /* a log still open: leave it in /tmp */ }
        }
    }

    private sealed record Options(bool Json, int Epochs, int[] Batches, int[] Layers, int Workers, int TrainLimit, string[] Modes, string DataDir,
        int[] ServerShards, int Rounds, int Hosts, string Link, int Chunk)
    {
        public static Options Parse(string[] args)
        {
            string? Arg(string name)
            {
                int i = Array.IndexOf(args, name);
                if (i < 0) return null;
                return i + 1 < args.Length ? args[i + 1] : throw new ArgumentException($"{name}: needs a value");
            }
            int Positive(string name, string text) =>
                int.Parse(text) is var v and > 0 ? v : throw new ArgumentException($"{name}: {text} is not a positive integer");
            int[] List(string name, string text) => [.. text.Split(',').Select(t => Positive(name, t.Trim()))];

            var known = new HashSet<string> { "--json", "--epochs", "--batch", "--model", "--workers", "--train-limit", "--modes", "--data-dir", "--server-shards", "--rounds", "--hosts", "--link", "--chunk" };
            for (int i = 0; i < args.Length; i++)
            {
                if (!known.Contains(args[i])) throw new ArgumentException($"unknown argument '{args[i]}'");
                if (args[i] != "--json") i++;
            }
            int hosts = Arg("--hosts") is { } h ? Positive("--hosts", h) : 0;
            // --hosts alone: core against the emulated hosts.
            var modes = (Arg("--modes") ?? (hosts > 0 ? "core,hosts" : "core,embedded,processes")).Split(',');
            if (modes.FirstOrDefault(m => !AllModes.Contains(m)) is { } bad) throw new ArgumentException($"--modes: unknown '{bad}' (core, embedded, processes, hosts)");
            if (modes.Contains("hosts") && hosts < 2) throw new ArgumentException("--modes hosts needs --hosts N (2 or more)");
            string link = Arg("--link") ?? "1gbit";
            if (!System.Text.RegularExpressions.Regex.IsMatch(link, "^[1-9][0-9]*(k|m|g)?bit$")) throw new ArgumentException($"--link: '{link}' is not a tc rate such as 1gbit or 100mbit");
            int trainLimit = Arg("--train-limit") is { } t ? int.Parse(t) : 0;
            if (trainLimit < 0) throw new ArgumentException("--train-limit: must be 0 (all) or positive");
            return new Options(
                args.Contains("--json"),
                Positive("--epochs", Arg("--epochs") ?? "3"),
                List("--batch", Arg("--batch") ?? "64,256"),
                List("--model", Arg("--model") ?? "784,128,64,10"),
                Positive("--workers", Arg("--workers") ?? "2"),
                trainLimit,
                [.. AllModes.Where(modes.Contains)],
                Arg("--data-dir") ?? DatasetCatalog.DefaultDataDir(),
                List("--server-shards", Arg("--server-shards") ?? Arg("--workers") ?? "2"),
                Positive("--rounds", Arg("--rounds") ?? "2"),
                hosts,
                link,
                Arg("--chunk") is { } c ? Positive("--chunk", c) : 0);
        }
    }

    /// <summary>Where things are: this build's CLI and silo, cluster.sh, and the temporary folder of this invocation.</summary>
    private sealed record Paths(string Work)
    {
        public static readonly string Root = FindRoot();
        // bench/Backprop.Bench/bin/<configuration>/net10.0: the CLI and silo are built in the same configuration.
        public static readonly string Configuration = new DirectoryInfo(AppContext.BaseDirectory).Parent!.Name;
        public string Cli => Path.Combine(Root, "src/Client/bin", Configuration, "net10.0/backprop.dll");
        public string Silo => Path.Combine(Root, "src/Silo/bin", Configuration, "net10.0/Backprop.Silo.dll");
        public string ClusterScript => Path.Combine(Root, "deploy/local/cluster.sh");
        public string DataDir => Path.Combine(Work, "data");
        public string State => Path.Combine(Work, "state");

        private static string FindRoot()
        {
            var dir = new DirectoryInfo(AppContext.BaseDirectory);
            while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "Backprop.Distributed.sln"))) dir = dir.Parent;
            return dir?.FullName ?? throw new BenchException("repository root not found above " + AppContext.BaseDirectory);
        }
    }

    private sealed class Bench(Options options, Paths paths, CancellationToken cancel)
    {

        private RunSpec SpecFor(int batch, int shards = 1) => Presets.PyTorchMlp with
        {
            Model = Presets.PyTorchMlp.Model with { Layers = options.Layers },
            BatchSize = batch,
            ChunkSize = options.Chunk > 0 ? Math.Min(options.Chunk, batch) : RunSpec.DefaultChunkSize(batch),
            Epochs = options.Epochs + 1,
            Workers = options.Workers,
            TrainLimit = options.TrainLimit,
            ServerShards = shards,
        };

        public async Task RunAll()
        {
            // Every spec checked before anything starts: a refused one is a one-line error, not a failure mid-run.
            foreach (int batch in options.Batches)
                foreach (int shards in options.ServerShards)
                    try
                    {
                        (SpecFor(batch, shards) with { Workers = Math.Max(options.Workers, options.Hosts) }).Validate(threadsPerWorker: 1);
                    }
                    catch (ArgumentException e)
                    {
                        throw new BenchException($"batch {batch}, {shards} shards: {e.Message}");
                    }
            foreach (var path in new[] { paths.Cli, paths.Silo }.Where(_ => options.Modes.Any(m => m != "core")))
                if (!File.Exists(path)) throw new BenchException($"{path} is not built; run the bench with `dotnet run -c {Paths.Configuration} --project bench/Backprop.Bench`, which builds it");
            if (!options.Json)
                Console.Error.WriteLine($"{Environment.ProcessorCount} cores, {RuntimeInformation.OSArchitecture}, Vector<float> {Vector<float>.Count * 32} bits, Vector512 accelerated: {System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated}; {Paths.Configuration} build");

            Dataset? train = null;
            if (options.Modes.Contains("core"))
            {
                Progress("core: loading MNIST");
                train = DatasetCatalog.Load(Path.Combine(paths.DataDir, "mnist"), "mnist").Train;
            }
            // One cluster for every round and batch size: starting silos (each loads MNIST) takes longer than a small run.
            await using var cluster = options.Modes.Contains("processes")
                ? await LocalCluster.Start(paths.ClusterScript, paths.State, paths.Silo, paths.DataDir, options.Workers, cancel)
                : null;
            await using var hosts = options.Modes.Contains("hosts")
                ? await EmulatedHosts.Start(options.Hosts, options.Link, paths.Silo, paths.DataDir, paths.Work, cancel)
                : null;
            // Modes interleaved round by round (core, embedded, processes, core, ...), so that the machine's drift hits all alike.
            var rows = new List<Row>();
            for (int round = 1; round <= options.Rounds; round++)
                foreach (int batch in options.Batches)
                {
                    if (train is not null) rows.Add(MeasureCore(SpecFor(batch), train));
                    foreach (int shards in options.ServerShards)
                    {
                        if (options.Modes.Contains("embedded"))
                            rows.Add(await MeasureCli("embedded", SpecFor(batch, shards), silos: 1, ["--threads-per-worker", "1"], round));
                        if (cluster is not null)
                            rows.Add(await MeasureCli("processes", SpecFor(batch, shards), silos: options.Workers, ["--gateway", cluster.Gateways, "--cluster-id", cluster.ClusterId], round));
                        if (hosts is not null)
                        {
                            var spec = SpecFor(batch, shards) with { Workers = options.Hosts };
                            rows.Add(await MeasureCli("hosts", spec, silos: options.Hosts, ["--gateway", hosts.Gateway, "--cluster-id", hosts.ClusterId], round, hosts) with
                            {
                                Hosts = options.Hosts,
                                Link = options.Link,
                                BusiestLinkBytesPerStep = BusiestLinkBytes(spec.Shards, options.Hosts),
                            });
                        }
                    }
                }
            var merged = rows.GroupBy(r => (r.Mode, r.BatchSize, r.ServerShards)).Select(g => Merge([.. g])).ToList();
            // The floor under the processes rows' pushes, measured the way `wire` does, after the runs so as not to disturb them.
            double? tcpFloor = merged.Any(r => r.Mode == "processes") ? Math.Round(await WireBench.TcpFloorGBps(merged[0].Parameters * sizeof(float), 100), 2) : null;
            foreach (var row in merged)
            {
                var core = merged.FirstOrDefault(r => r.Mode == "core" && r.BatchSize == row.BatchSize);
                var wired = row with
                {
                    TransferGBps = row is { WireBytesPerStep: > 0, StepMicroseconds.ServerCall: > 0 } ? Math.Round(row.WireBytesPerStep.Value / row.StepMicroseconds.ServerCall / 1e3, 2) : null,
                    TcpLoopbackGBps = row.Mode == "processes" ? tcpFloor : null,
                };
                Emit(core is null ? wired : wired with
                {
                    CoreSecondsPerEpochMedian = core.SecondsPerEpochMedian,
                    CoreSecondsPerEpochBest = core.SecondsPerEpochBest,
                    Ratio = Math.Round(row.SecondsPerEpochMedian / core.SecondsPerEpochMedian, 3),
                    RatioBest = Math.Round(row.SecondsPerEpochBest / core.SecondsPerEpochBest, 3),
                });
            }
        }

        /// <summary>One row of a mode and batch size from its rounds: every timed epoch's seconds, their median and best; the rest as medians over the rounds.</summary>
        private static Row Merge(Row[] rounds)
        {
            var seconds = rounds.SelectMany(r => r.SecondsPerEpoch).ToArray();
            double? MedianOf(Func<Row, double?> field) => rounds.Select(field).OfType<double>().ToArray() is { Length: > 0 } v ? Math.Round(Median(v), 1) : null;
            var breakdowns = rounds.Select(r => r.StepMicroseconds).OfType<StepBreakdown>().ToArray();
            double B(Func<StepBreakdown, double> field) => Math.Round(Median(breakdowns.Select(field)), 1);
            return rounds[0] with
            {
                Epochs = seconds.Length,
                Rounds = rounds.Length,
                SecondsPerEpoch = seconds,
                SecondsPerEpochMedian = Math.Round(Median(seconds), 4),
                SecondsPerEpochBest = seconds.Min(),
                EpochSecondsMedian = rounds[0].EpochSecondsMedian is null ? null : Math.Round(Median(rounds.Select(r => r.EpochSecondsMedian!.Value)), 4),
                MicrosecondsPerStep = Math.Round(Median(seconds) / rounds[0].SecondsPerEpochMedian * rounds[0].MicrosecondsPerStep, 1),
                WireBytesPerStep = MedianOf(r => r.WireBytesPerStep),
                StepsPerWorkerCall = MedianOf(r => r.StepsPerWorkerCall),
                AllocatedBytesPerStep = MedianOf(r => r.AllocatedBytesPerStep),
                BusiestLinkBytesPerStepMeasured = MedianOf(r => r.BusiestLinkBytesPerStepMeasured),
                StepMicroseconds = breakdowns.Length == 0 ? null : new StepBreakdown(B(b => b.SlowestCompute), B(b => b.FastestCompute), B(b => b.Transfer),
                    B(b => b.ReduceAndStep), B(b => b.ServerCall), B(b => b.BarrierWait)),
                TestAccuracyLast = rounds[^1].TestAccuracyLast,
                LoadAverage = [rounds[0].LoadAverage?[0] ?? double.NaN, rounds[^1].LoadAverage?[^1] ?? double.NaN],
            };
        }

        private Row MeasureCore(RunSpec spec, Dataset train)
        {
            double? loadBefore = LoadAverage();
            Progress($"core, batch {spec.BatchSize}: warming up, then {options.Epochs} epochs on {options.Workers} threads");
            using var trainer = new LocalTrainer(spec, train, options.Workers);
            int steps = StepsPerEpoch(spec, train.Count);
            // As `core`: warm up until the JIT has nothing left to compile (its background thread would take one of
            // the cores from the lock-step threads), at least 2 epochs and at most 10.
            for (int warm = 0; warm < 10; warm++)
            {
                cancel.ThrowIfCancellationRequested();
                long compiled = System.Runtime.JitInfo.GetCompiledMethodCount();
                trainer.TrainEpoch(0);
                if (warm > 0 && System.Runtime.JitInfo.GetCompiledMethodCount() == compiled) break;
            }
            var seconds = new List<double>();
            long allocated = 0;
            for (int e = 1; e <= options.Epochs; e++)
            {
                cancel.ThrowIfCancellationRequested();
                long before = GC.GetAllocatedBytesForCurrentThread();
                long start = Stopwatch.GetTimestamp();
                trainer.TrainEpoch(e);
                seconds.Add(Stopwatch.GetElapsedTime(start).TotalSeconds);
                allocated += GC.GetAllocatedBytesForCurrentThread() - before;
            }
            double median = Median(seconds);
            return NewRow("core", spec, silos: 0, workers: 1, train.Count) with
            {
                SecondsSource = "stopwatch around LocalTrainer.TrainEpoch (training only)",
                SecondsPerEpochMedian = Math.Round(median, 4),
                SecondsPerEpoch = [.. seconds.Select(s => Math.Round(s, 4))],
                MicrosecondsPerStep = Math.Round(median / steps * 1e6, 1),
                WireBytesPerStep = 0,
                AllocatedBytesPerStep = Math.Round((double)allocated / (options.Epochs * steps), 1),
                AllocatedBytesSource = "the training thread",
                LoadAverage = Loads(loadBefore),
            };
        }

        /// <summary>Runs `backprop train` for the spec (N+1 epochs) and reads the epochs from its metrics file.</summary>
        private async Task<Row> MeasureCli(string mode, RunSpec spec, int silos, string[] where, int round, EmulatedHosts? hosts = null)
        {
            double? loadBefore = LoadAverage();
            Progress($"{mode}, batch {spec.BatchSize}: `backprop train`, {spec.Epochs} epochs ({options.Epochs} timed) with {spec.Workers} workers");
            string metrics = Path.Combine(paths.Work, $"{mode}-b{spec.BatchSize}-s{spec.ServerShards}-r{round}.jsonl");
            string[] args =
            [
                paths.Cli, "train", "--preset", "pytorch-mlp", "--layers", string.Join(',', spec.Model.Layers),
                "--batch-size", $"{spec.BatchSize}", "--chunk-size", $"{spec.ChunkSize}", "--epochs", $"{spec.Epochs}",
                "--workers", $"{spec.Workers}", "--server-shards", $"{spec.ServerShards}", "--train-limit", $"{spec.TrainLimit}", "--data-dir", paths.DataDir,
                "--metrics-out", metrics, "--run-id", $"bench-{mode}-b{spec.BatchSize}-s{spec.ServerShards}-r{round}-{Environment.ProcessId}", .. where,
            ];
            // Generous: the big model on processes takes tens of seconds an epoch; a hung run must still end.
            var (program, arguments) = hosts?.OnHost0(args) ?? ("dotnet", args);
            long[]? sentBefore = hosts?.SentBytes();
            var result = await Child.Run(program, arguments, [], TimeSpan.FromMinutes(5 + 10 * spec.Epochs), cancel);
            if (result.Code != 0) throw new BenchException($"{mode} run failed (exit {result.Code}): {Tail(result.Output + result.Error)}");
            long? busiestSent = hosts?.SentBytes().Zip(sentBefore!, (after, before) => after - before).Max();

            var epochs = File.ReadAllLines(metrics).Where(l => l.Length > 0).Select(l => JsonNode.Parse(l)!).ToList();
            var timed = epochs.Where(e => (int)e["epoch"]! > 1).ToList();   // epoch 1 is warm-up
            if (timed.Count == 0) throw new BenchException($"{mode} run reported no epoch after the first");
            var profiles = timed.Select(e => e["profile"]).ToList();
            bool profiled = profiles.All(p => p is not null);
            double P(JsonNode? p, string field) => (double)p![field]!;
            double ProfileMedian(string field) => Median(profiles.Select(p => P(p, field)));
            double StepMedianUs(string field) => Math.Round(ProfileMedian(field) * 1e6, 1);
            var seconds = timed.Select(e => profiled ? P(e["profile"], "trainSeconds") : (double)e["seconds"]!).ToList();
            double median = Median(seconds);
            int steps = StepsPerEpoch(spec, MnistTrainCount);   // the metrics' "steps" counts from the start of the run
            return NewRow(mode, spec, silos, spec.Workers, MnistTrainCount) with
            {
                SecondsSource = profiled ? "profile.trainSeconds (training only)" : "epoch seconds (profile absent: includes evaluation)",
                SecondsPerEpochMedian = Math.Round(median, 4),
                SecondsPerEpoch = [.. seconds.Select(s => Math.Round(s, 4))],
                EpochSecondsMedian = Math.Round(Median(timed.Select(e => (double)e["seconds"]!)), 4),
                MicrosecondsPerStep = Math.Round(median / steps * 1e6, 1),
                // Everything the busiest host sent during the run (warm-up epoch, evaluations, membership) over all its steps.
                BusiestLinkBytesPerStepMeasured = busiestSent is { } sent ? Math.Round(sent / (double)(steps * spec.Epochs)) : null,
                WireBytesPerStep = profiled ? Math.Round(ProfileMedian("wireBytesPerStep"), 1) : null,
                StepsPerWorkerCall = profiled ? Math.Round(Median(profiles.Select(p => P(p, "steps") / P(p, "workerCalls"))), 1) : null,
                AllocatedBytesPerStep = profiled ? Math.Round(ProfileMedian("allocatedBytesPerStep"), 1) : null,
                AllocatedBytesSource = profiled ? "every process of the cluster (profile)" : null,
                StepMicroseconds = profiled ? new StepBreakdown(
                    StepMedianUs("slowestComputeSeconds"), StepMedianUs("fastestComputeSeconds"), StepMedianUs("transferSeconds"),
                    StepMedianUs("reduceAndStepSeconds"), StepMedianUs("serverCallSeconds"), StepMedianUs("barrierWaitSeconds")) : null,
                TestAccuracyLast = (double)epochs[^1]["testAccuracy"]!,
                LoadAverage = Loads(loadBefore),
            };
        }

        private Row NewRow(string mode, RunSpec spec, int silos, int workers, int trainCount) => new(
            mode, silos, workers, Threads: options.Workers, ServerShards: mode == "core" ? 0 : spec.ServerShards, spec.BatchSize, spec.ChunkSize, string.Join('-', spec.Model.Layers), spec.Model.ParameterCount,
            spec.TrainLimit, SamplesPerEpoch: spec.TrainCount(trainCount), Epochs: options.Epochs,
            WarmUp: mode == "core" ? "until the JIT is quiet (2-10 epochs)" : "first epoch of the run excluded",
            VectorWidth: Vector<float>.Count * 32, Vector512Accelerated: System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated)
        {
            Ratio = mode == "core" ? 1.0 : null,
            RatioBest = mode == "core" ? 1.0 : null,
        };

        private void Emit(Row row)
        {
            if (options.Json)
            {
                Console.WriteLine(JsonSerializer.Serialize(row, JsonOptions));
                return;
            }
            string where = row.Mode == "core" ? $"LocalTrainer on {row.Threads} threads" : $"{row.Workers} workers x 1 thread on {row.Silos} silo(s)";
            Console.WriteLine($"{row.Mode,-9} {row.Model} batch {row.BatchSize} chunk {row.ChunkSize}, {where}: "
                + $"{row.SecondsPerEpochMedian:F3} s/epoch (median of {row.Epochs} over {row.Rounds} round(s), best {row.SecondsPerEpochBest:F3}; {row.SecondsSource})"
                + (row.Ratio is { } r ? $", {r:F2}x core (best/best {row.RatioBest:F2}x)" : "")
                + (row.WireBytesPerStep is { } w ? $", wire {w / 1e6:F2} MB/step" : "")
                + (row.TransferGBps is { } o ? $" between processes at {o:F2} GB/s" + (row.TcpLoopbackGBps is { } t ? $" (raw TCP on loopback {t:F2} GB/s)" : "") : "")
                + (row.StepsPerWorkerCall is { } c ? $", {c:F0} steps/worker call" : "")
                + (row.AllocatedBytesPerStep is { } a ? $", allocated {a:F0} B/step" : "")
                + (row.StepMicroseconds is { } s ? $"; per step (us): compute {s.SlowestCompute:F0} slowest / {s.FastestCompute:F0} fastest, transfer {s.Transfer:F0}, reduce+step {s.ReduceAndStep:F0}, server call {s.ServerCall:F0}, barrier {s.BarrierWait:F0}" : ""));
        }

        private void Progress(string message)
        {
            cancel.ThrowIfCancellationRequested();
            Console.Error.WriteLine($"[{DateTime.Now:HH:mm:ss}] {message}");
        }
    }

    private static readonly JsonSerializerOptions JsonOptions = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    };

    /// <summary>One row of the output; see bench/README.md for what each field means.</summary>
    private sealed record Row(
        string Mode, int Silos, int Workers, int Threads, int ServerShards, int BatchSize, int ChunkSize, string Model, long Parameters,
        int TrainLimit, int SamplesPerEpoch, int Epochs, string WarmUp, int VectorWidth, bool Vector512Accelerated)
    {
        public string SecondsSource { get; init; } = "";
        public double SecondsPerEpochMedian { get; init; }
        public double[] SecondsPerEpoch { get; init; } = [];
        public double? EpochSecondsMedian { get; init; }
        public double SecondsPerEpochBest { get; init; }
        public int Rounds { get; init; } = 1;
        public double? CoreSecondsPerEpochMedian { get; init; }
        public double? CoreSecondsPerEpochBest { get; init; }
        public double? Ratio { get; init; }
        public double? RatioBest { get; init; }
        public double MicrosecondsPerStep { get; init; }
        public double? WireBytesPerStep { get; init; }
        public double? TransferGBps { get; init; }
        public double? TcpLoopbackGBps { get; init; }
        public double? StepsPerWorkerCall { get; init; }
        public double? AllocatedBytesPerStep { get; init; }
        public string? AllocatedBytesSource { get; init; }
        public StepBreakdown? StepMicroseconds { get; init; }
        public double? TestAccuracyLast { get; init; }
        public int? Hosts { get; init; }
        public string? Link { get; init; }
        public double? BusiestLinkBytesPerStep { get; init; }
        public double? BusiestLinkBytesPerStepMeasured { get; init; }
        public double[]? LoadAverage { get; init; }
    }

    /// <summary>Medians over the timed epochs of the coordinator's per-step means, in microseconds.</summary>
    private sealed record StepBreakdown(double SlowestCompute, double FastestCompute, double Transfer, double ReduceAndStep, double ServerCall, double BarrierWait);

    /// <summary>
    /// The 1-minute load average before and after a row (Linux): on a shared 2-core machine anything above ~2
    /// means other processes took cores from the measurement.
    /// </summary>
    private static double[]? Loads(double? before) => before is { } b && LoadAverage() is { } a ? [b, a] : null;

    private static double? LoadAverage()
    {
        try
        {
            return double.Parse(File.ReadAllText("/proc/loadavg").Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
        {
            return null;
        }
    }

    /// <summary>
    /// Bytes the busiest host sends a step (it receives as many) with one worker per host and shard j on host j mod N:
    /// its worker's pushes to the shards elsewhere, and its shards' next versions to the N − 1 other workers. One
    /// shard: (N − 1)·V from its host; N shards: 2·V·(N − 1)/N from every host.
    /// </summary>
    private static double BusiestLinkBytes(ShardLayout layout, int hosts)
    {
        long busiest = 0;
        for (int h = 0; h < hosts; h++)
        {
            long sent = 0;
            for (int j = 0; j < layout.Shards; j++)
                sent += j % hosts == h ? (long)layout.Length(j) * (hosts - 1) : layout.Length(j);
            busiest = Math.Max(busiest, sent);
        }
        return busiest * sizeof(float);
    }

    private static int StepsPerEpoch(RunSpec spec, int available) => (spec.TrainCount(available) + spec.BatchSize - 1) / spec.BatchSize;

    private static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        int n = sorted.Length;
        return n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
    }

    private static string Tail(string text)
    {
        var lines = text.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        return string.Join(" | ", lines.TakeLast(5));
    }
}

/// <summary>A failure of the bench itself (a run that failed, a cluster that did not start): one line on stderr.</summary>
public sealed class BenchException(string message) : Exception(message);
