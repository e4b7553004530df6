using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.RegularExpressions;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;

namespace Backprop.Bench;

/// <summary>
/// `bench soak`: the Redis cluster of deploy/local/cluster.sh (its own redis-server with a password, silo processes on
/// loopback) trains runs back to back with the CLI while a silo is killed with SIGKILL every few minutes and started
/// again. What it measures is whether anything accumulates: the silos' and Redis' memory, file handles and threads,
/// Redis' keys and the state folder at the start, after the first run and at the end; and whether every run completed
/// with the parameters of <see cref="LocalTrainer"/> on the same spec and data, in this process.
/// </summary>
public static class SoakBench
{
    public const string Usage = """
        usage: Backprop.Bench soak [--minutes M] [--kill-every SECONDS] [--silos N] [--role split|all] [--json]
                                   [--epochs N] [--train-limit N] [--seed S] [--data-dir DIR] [--keep-finished-runs K]

        Starts redis-server and N silo processes with deploy/local/cluster.sh (--redis --distinct-addresses: each silo
        on its own loopback address), trains runs soak-1, soak-2, ... back to back with `backprop train --redis ...`
        (the pytorch-mlp preset, run k with seed k) until M minutes have passed, and every SECONDS kills a silo chosen
        at random (seeded by --seed) with SIGKILL and starts it again 5 s later. At the start, after the first run
        and at the end it records every silo's and redis-server's RSS, open file handles and threads, Redis' keys
        and memory, and the files under the state folder; each run's final parameterSha256 is compared with
        LocalTrainer's. Prints a table and a verdict (JSON lines on stdout with --json, the table then on stderr).
        Exit code 0 when flat and every run completed bit-identical, 1 otherwise.

          --minutes M         how long runs are started (default 30); the last one is finished
          --kill-every S      seconds between kills (default 180; 0 = no kills)
          --silos N           silo processes (default 3)
          --role split|all    split (default): 1 server silo and N-1 worker silos (N >= 3); all: N silos of role all
          --epochs N          epochs of every run (default 30)
          --train-limit N     first N training images (default 12000: 20-45 s a run on the 2-core machine of record)
          --seed S            seed of the kill schedule (default 1)
          --data-dir DIR      data directory holding mnist/ (default the CLI's; generated digits when MNIST is absent)
          --keep-finished-runs K   the silos' retention (default 5): older finished runs are deleted, so Redis must
                              stay within K runs' keys and memory

        Needs redis-server and redis-cli (apt-get install -y redis-server) and the Release build of src/Client and
        src/Silo, which `dotnet run -c Release --project bench/Backprop.Bench` builds with the bench.
        """;

    public static async Task<int> Run(string[] args)
    {
        if (!BenchArgs.TryParse(args, "soak", Usage, SoakOptions.Parse, out var options, out int exitCode)) return exitCode;
        var paths = new SoakPaths();
        foreach (var path in new[] { paths.Cli, paths.Silo })
            if (!File.Exists(path)) { Console.Error.WriteLine($"error: {path} is not built; run the bench with `dotnet run -c Release --project bench/Backprop.Bench`"); return 2; }

        // Ctrl+C or SIGTERM: stop the child in flight and the cluster, then exit. A second signal ends the process at once.
        using var interrupt = new CancellationTokenSource();
        void OnSignal(PosixSignalContext context)
        {
            context.Cancel = !interrupt.IsCancellationRequested;
            if (context.Cancel) Console.Error.WriteLine("interrupted: stopping what the bench started");
            interrupt.Cancel();
        }
        using var onInt = PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal);
        using var onTerm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal);

        string work = Directory.CreateTempSubdirectory("backprop-soak-").FullName;
        bool keep = true;
        try
        {
            var data = PrepareData(options.DataDir, Path.Combine(work, "data"));
            await using var cluster = await SoakCluster.Start(paths, Path.Combine(work, "state"), Path.Combine(work, "data"), options.Roles(), options.KeepFinishedRuns, interrupt.Token);
            var soak = new Soak(options, paths, cluster, work, data.Train, interrupt.Token);
            bool good = await soak.Run();
            keep = !good;
            return good ? 0 : 1;
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
            // Logs of a soak that found something are worth reading; a clean one leaves nothing behind.
            if (keep) Console.Error.WriteLine($"soak: logs and state kept in {work}");
            else try { Directory.Delete(work, recursive: true); } catch (IOException) { /* a log still open: leave it in /tmp */ }
        }
    }

    /// <summary>MNIST linked into the bench's own data directory (the silos read it there), or generated digits of the same shape.</summary>
    private static TrainTest PrepareData(string dataDir, string ownDataDir)
    {
        var mnist = DatasetCatalog.DirectoryOf(dataDir, "mnist");
        string own = Path.Combine(ownDataDir, "mnist");
        Directory.CreateDirectory(ownDataDir);
        if (DatasetCatalog.IsPresent(mnist))
        {
            Directory.CreateSymbolicLink(own, Path.GetFullPath(mnist));
            return DatasetCatalog.Load(own, "mnist");
        }
        Console.Error.WriteLine($"soak: MNIST not in {mnist}; training on generated digits (SyntheticDigits, 60,000/10,000)");
        var data = SyntheticDigits.Create(60_000, 10_000, seed: 1);
        IdxWriter.WriteDataset(own, data);
        return data;
    }
}

internal sealed record SoakOptions(double Minutes, int KillEverySeconds, int Silos, string Role, bool Json, int Epochs, int TrainLimit, int Seed, string DataDir, int KeepFinishedRuns)
{
    public static SoakOptions Parse(string[] args)
    {
        var known = new HashSet<string> { "--minutes", "--kill-every", "--silos", "--role", "--json", "--epochs", "--train-limit", "--seed", "--data-dir", "--keep-finished-runs" };
        for (int i = 0; i < args.Length; i++)
        {
            if (!known.Contains(args[i])) throw new ArgumentException($"unknown argument '{args[i]}'");
            if (args[i] != "--json" && ++i >= args.Length) throw new ArgumentException($"{args[i - 1]}: needs a value");
        }
        string? Arg(string name) => Array.IndexOf(args, name) is var i and >= 0 ? args[i + 1] : null;
        int Int(string name, int fallback, int min) =>
            Arg(name) is { } t ? (int.Parse(t, CultureInfo.InvariantCulture) is var v && v >= min ? v : throw new ArgumentException($"{name}: {t} is below {min}")) : fallback;
        double minutes = double.Parse(Arg("--minutes") ?? "30", CultureInfo.InvariantCulture);
        if (!(minutes > 0)) throw new ArgumentException("--minutes: must be positive");
        string role = Arg("--role") ?? "split";
        if (role is not ("split" or "all")) throw new ArgumentException($"--role: '{role}' is not split or all");
        int silos = Int("--silos", 3, 1);
        if (role == "split" && silos < 3) throw new ArgumentException("--silos: split needs at least 3 (1 server silo, 2 worker silos)");
        if (role == "all" && silos < 2) throw new ArgumentException("--silos: at least 2, so that one survives a kill");
        return new SoakOptions(minutes, Int("--kill-every", 180, 0), silos, role, args.Contains("--json"), Int("--epochs", 30, 1),
            Int("--train-limit", 12_000, 0), Int("--seed", 1, 0), Arg("--data-dir") ?? DatasetCatalog.DefaultDataDir(), Int("--keep-finished-runs", 5, 1));
    }

    /// <summary>The role of every silo slot, in cluster.sh's order (servers first).</summary>
    public string[] Roles() => Role == "all" ? [.. Enumerable.Repeat("all", Silos)] : ["server", .. Enumerable.Repeat("worker", Silos - 1)];
}

/// <summary>This build's CLI and silo (the bench's configuration), and cluster.sh.</summary>
internal sealed class SoakPaths
{
    public SoakPaths()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "Backprop.Distributed.sln"))) dir = dir.Parent;
        string root = dir?.FullName ?? throw new BenchException("repository root not found above " + AppContext.BaseDirectory);
        // bench/Backprop.Bench/bin/<configuration>/net10.0: the CLI and silo are built in the same configuration.
        string configuration = new DirectoryInfo(AppContext.BaseDirectory).Parent!.Name;
        Cli = Path.Combine(root, "src/Client/bin", configuration, "net10.0/backprop.dll");
        Silo = Path.Combine(root, "src/Silo/bin", configuration, "net10.0/Backprop.Silo.dll");
        Script = Path.Combine(root, "deploy/local/cluster.sh");
    }

    public string Cli { get; }
    public string Silo { get; }
    public string Script { get; }
}

/// <summary>
/// Redis and the silos, through cluster.sh (start --redis, kill I, restart I, stop): the same processes, environment and
/// logs as a user's local Redis cluster. Disposing stops them all (cluster.sh stop; any pid left is killed by number).
/// </summary>
internal sealed class SoakCluster : IAsyncDisposable
{
    private readonly Dictionary<string, string> _env;
    private readonly string _script;

    private SoakCluster(string script, string state, Dictionary<string, string> env, string[] roles, string redis, string clusterId)
    {
        (_script, State, _env, Roles, Redis, ClusterId) = (script, state, env, roles, redis, clusterId);
    }

    public string State { get; }
    public string[] Roles { get; }
    public string Redis { get; }
    public string ClusterId { get; }
    public string PasswordFile => Path.Combine(State, "redis.password");
    public string[] CliAddress => ["--redis", Redis, "--redis-password-file", PasswordFile, "--cluster-id", ClusterId];

    public static async Task<SoakCluster> Start(SoakPaths paths, string state, string dataDir, string[] roles, int keepFinishedRuns, CancellationToken cancel)
    {
        var env = new Dictionary<string, string>
        {
            ["BACKPROP_STATE"] = state, ["BACKPROP_SILO_DLL"] = paths.Silo,
            ["BACKPROP_KEEP_FINISHED_RUNS"] = keepFinishedRuns.ToString(CultureInfo.InvariantCulture),
            // Runs here take seconds: the 10-minute floor meant for clients fetching models would hold dozens.
            ["BACKPROP_KEEP_FINISHED_MIN_AGE"] = "0",
        };
        int[] ports = FreePorts(3);
        string clusterId = $"backprop-soak-{Environment.ProcessId}";
        var cluster = new SoakCluster(paths.Script, state, env, roles, $"127.0.0.1:{ports[2]}", clusterId);
        int servers = roles.Count(r => r == "server");
        string[] layout = servers > 0 ? ["--servers", $"{servers}", "--workers", $"{roles.Length - servers}"] : ["--silos", $"{roles.Length}"];
        Log($"starting redis-server ({cluster.Redis}, password) and {roles.Length} silos ({string.Join(", ", roles)}), cluster {clusterId}");
        try
        {
            // --distinct-addresses: silo i on 127.0.0.(i+2) with the same ports, as separate machines would be.
            await cluster.Script(TimeSpan.FromMinutes(5), cancel, ["start", "--redis", "--redis-port", $"{ports[2]}", .. layout, "--distinct-addresses",
                "--silo-port", $"{ports[0]}", "--gateway-port", $"{ports[1]}", "--cluster-id", clusterId, "--data-dir", dataDir]);
        }
        catch
        {
            await cluster.DisposeAsync();
            throw;
        }
        return cluster;
    }

    public Task<string> Kill(int slot, CancellationToken cancel) => Script(TimeSpan.FromSeconds(60), cancel, ["kill", $"{slot}"]);

    public Task<string> Restart(int slot, CancellationToken cancel) => Script(TimeSpan.FromSeconds(120), cancel, ["restart", $"{slot}"]);

    /// <summary>Silo slot i's pid (line i of STATE/pids), or null.</summary>
    public int?[] SiloPids()
    {
        string file = Path.Combine(State, "pids");
        var lines = File.Exists(file) ? File.ReadAllLines(file) : [];
        return [.. Enumerable.Range(0, Roles.Length).Select(i => i < lines.Length && int.TryParse(lines[i], out int p) ? p : (int?)null)];
    }

    public int? RedisPid() =>
        File.Exists(Path.Combine(State, "redis.pid")) && int.TryParse(File.ReadAllText(Path.Combine(State, "redis.pid")).Trim(), out int p) ? p : null;

    private async Task<string> Script(TimeSpan limit, CancellationToken cancel, string[] args)
    {
        var result = await Child.Run("bash", [_script, .. args], _env, limit, cancel);
        if (result.Code != 0) throw new BenchException($"cluster.sh {args[0]} failed (exit {result.Code}): {result.Error.Trim()} {result.Output.Trim()}");
        return result.Output.Trim();
    }

    public async ValueTask DisposeAsync()
    {
        // Read before stopping: cluster.sh removes the pid files once it has stopped what they name.
        var pids = SiloPids().Append(RedisPid()).OfType<int>().ToList();
        try
        {
            await Script(TimeSpan.FromSeconds(90), CancellationToken.None, ["stop"]);
            Log("cluster stopped");
            return;
        }
        catch (Exception e) when (e is BenchException or IOException or System.ComponentModel.Win32Exception)
        {
            Console.Error.WriteLine($"soak: cluster.sh stop failed ({e.Message}); killing its processes by pid");
        }
        foreach (int pid in pids)
        {
            try
            {
                using var p = Process.GetProcessById(pid);
                if (!p.HasExited && p.ProcessName is "dotnet" or "redis-server") p.Kill();
            }
            catch (Exception e) when (e is ArgumentException or InvalidOperationException or System.ComponentModel.Win32Exception)
            {
                // gone already
            }
        }
    }

    /// <summary>Distinct free loopback ports (silo, gateway, Redis): held open together so that the OS hands out different ones.</summary>
    private static int[] FreePorts(int count)
    {
        var listeners = Enumerable.Range(0, count).Select(_ => new TcpListener(IPAddress.Loopback, 0)).ToList();
        listeners.ForEach(l => l.Start());
        var ports = listeners.Select(l => ((IPEndPoint)l.LocalEndpoint).Port).ToArray();
        listeners.ForEach(l => l.Stop());
        return ports;
    }

    public static void Log(string message) => Console.Error.WriteLine($"[{DateTime.Now:HH:mm:ss}] soak: {message}");
}

/// <summary>One soak: the runs, the kills beside them, the snapshots and the verdict.</summary>
internal sealed class Soak(SoakOptions options, SoakPaths paths, SoakCluster cluster, string work, Dataset train, CancellationToken cancel)
{
    // The thread pool retires idle threads after ~20 s: figures taken sooner after a run count threads that are on their way out.
    private static readonly TimeSpan Settle = TimeSpan.FromSeconds(25);

    /// <summary>How long a killed silo stays down: long enough for the others to declare it dead (~1-2 s here).</summary>
    private static readonly TimeSpan Down = TimeSpan.FromSeconds(5);

    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private readonly List<SoakRun> _runs = [];
    private readonly List<SoakSiloEvent> _events = [];
    private readonly int[] _killsPerSlot = new int[cluster.Roles.Length];
    private readonly int[] _exitsPerSlot = new int[cluster.Roles.Length];
    // Kills and exits by the run in flight when they happened (noted then: the event itself is recorded after the restart).
    private readonly Dictionary<string, (int Kills, int Exits)> _byRun = [];
    private volatile string? _runInFlight;

    private TextWriter Table => options.Json ? Console.Error : Console.Out;

    /// <summary>Trains runs until the time is up while the kill loop runs beside; true when flat and every run has the reference bits.</summary>
    public async Task<bool> Run()
    {
        double? loadStart = SoakFigures.LoadAverage();
        var start = await Take("start");
        SoakSnapshot? warm = null;
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(cancel);
        deadline.CancelAfter(TimeSpan.FromMinutes(options.Minutes));
        var keeper = KeepLoop(deadline.Token);
        try
        {
            // At least one run, for the warm figures; then new runs until the time is up (the last one is finished).
            int n = 0;
            do
            {
                var run = await TrainOne(++n);
                _runs.Add(run);
                Emit(run);
                if (n == 1)
                {
                    await Task.Delay(Settle, cancel);
                    warm = await Take("warm");
                }
                else await Take($"after-{run.RunId}");
            }
            while (!deadline.IsCancellationRequested);
        }
        finally
        {
            deadline.Cancel();
            // The keeper ends at the deadline, after restarting a silo it killed: the end figures see every silo up.
            try { await keeper; } catch (OperationCanceledException) when (cancel.IsCancellationRequested) { }
        }
        await Task.Delay(Settle, cancel);
        var end = await Take("end");
        double minutes = _clock.Elapsed.TotalMinutes;
        var verdict = Judge(start, warm!, end, minutes, [loadStart, SoakFigures.LoadAverage()]);
        Print(start, warm!, end, verdict);
        Emit(verdict);
        return verdict.Flat && verdict.AllBitIdentical && verdict.SiloExits == 0;
    }

    /// <summary>
    /// The only place silos are killed and started, every 2 s: a silo that exited without being killed is recorded (with
    /// its log's last failure) and started again, so that the soak goes on and says so; a kill is due every --kill-every.
    /// </summary>
    private async Task KeepLoop(CancellationToken until)
    {
        var random = new Random(options.Seed);
        var every = TimeSpan.FromSeconds(options.KillEverySeconds);
        var nextKill = options.KillEverySeconds > 0 ? every : TimeSpan.MaxValue;
        while (true)
        {
            try { await Task.Delay(TimeSpan.FromSeconds(2), until); }
            catch (OperationCanceledException) { break; }
            await RestartExited();
            if (_clock.Elapsed < nextKill) continue;
            nextKill += every;
            int slot = random.Next(cluster.Roles.Length);
            SoakCluster.Log($"kill -9 silo-{slot} ({cluster.Roles[slot]}, pid {cluster.SiloPids()[slot]}) during {_runInFlight ?? "no run"}");
            Interlocked.Increment(ref _killsPerSlot[slot]);
            NoteForRun(kill: true);
            Record(await Restart("kill", slot, kill: true, reason: null));
        }
        // A last look: an exit at the very end is counted, and the end figures see every silo up.
        await RestartExited();
    }

    private async Task RestartExited()
    {
        var pids = cluster.SiloPids();
        for (int slot = 0; slot < pids.Length; slot++)
        {
            if (SoakFigures.IsRunning(pids[slot])) continue;
            string reason = LastFailure(Path.Combine(cluster.State, $"silo-{slot}.log"));
            SoakCluster.Log($"silo-{slot} ({cluster.Roles[slot]}, pid {pids[slot]}) exited without being killed: {reason}");
            Interlocked.Increment(ref _exitsPerSlot[slot]);
            NoteForRun(kill: false);
            Record(await Restart("exit", slot, kill: false, reason));
        }
    }

    private void NoteForRun(bool kill)
    {
        if (_runInFlight is not { } run) return;
        lock (_byRun)
        {
            var (kills, exits) = _byRun.GetValueOrDefault(run);
            _byRun[run] = kill ? (kills + 1, exits) : (kills, exits + 1);
        }
    }

    private void Record(SoakSiloEvent e)
    {
        lock (_events) _events.Add(e);
        Emit(e);
    }

    /// <summary>
    /// Why a silo stopped, from its log since it last logged "up": the exception its host's crit line ends with (the host
    /// stopping on a failed background service), else the first line at level fail, else its last line (an unhandled
    /// exception's stack trace ends there), shortened. Other fail lines come and go around a kill (calls to the dead silo).
    /// </summary>
    private static string LastFailure(string log)
    {
        var all = File.Exists(log) ? File.ReadAllLines(log) : [];
        int up = Array.FindLastIndex(all, l => l.Contains(" up: role ", StringComparison.Ordinal));
        var lines = all.Skip(Math.Max(0, up)).ToArray();
        string line = lines.FirstOrDefault(l => l.Contains(" crit: ", StringComparison.Ordinal)) is { } crit && crit.LastIndexOf(" | ", StringComparison.Ordinal) is var bar and > 0
            ? crit[..crit.IndexOf(" crit: ", StringComparison.Ordinal)] + " crit: host stopped:" + crit[(bar + 2)..]
            : lines.FirstOrDefault(l => l.Contains(" fail: ", StringComparison.Ordinal)) ?? lines.LastOrDefault() ?? "(no log)";
        return line.Length > 300 ? line[..300] + "..." : line;
    }

    /// <summary>SIGKILL to silo slot i when asked (cluster.sh kill), 5 s down, then cluster.sh restart (a new pid, the same address and ports).</summary>
    private async Task<SoakSiloEvent> Restart(string kind, int slot, bool kill, string? reason)
    {
        int? oldPid = cluster.SiloPids()[slot];
        string? run = _runInFlight;
        double at = _clock.Elapsed.TotalSeconds;
        string? error = null;
        if (kill)
        {
            try { await cluster.Kill(slot, cancel); }
            catch (BenchException e) { error = e.Message; }
            await Task.Delay(Down, cancel);
        }
        var up = Stopwatch.StartNew();
        // Twice: a restart can fail on a loaded machine (not up within cluster.sh's 60 s); a later kill of the slot tries again too.
        for (int attempt = 1; attempt <= 2; attempt++)
        {
            try
            {
                await cluster.Restart(slot, cancel);
                error = null;
                break;
            }
            catch (BenchException e)
            {
                error = e.Message;
            }
        }
        int? newPid = cluster.SiloPids()[slot];
        SoakCluster.Log(error is null ? $"silo-{slot} up again (pid {newPid}) after {up.Elapsed.TotalSeconds:F1} s" : $"silo-{slot}: {error}");
        return new SoakSiloEvent(kind, Math.Round(at, 1), slot, cluster.Roles[slot], oldPid, newPid, run, Math.Round(up.Elapsed.TotalSeconds, 1), reason, error);
    }

    /// <summary>`train` for run soak-n (seed n); re-attaches with `watch` while the run goes on without its client; compares the bits.</summary>
    private async Task<SoakRun> TrainOne(int n)
    {
        string runId = $"soak-{n}";
        long seed = n;
        _runInFlight = runId;
        var clock = Stopwatch.StartNew();
        SoakCluster.Log($"{runId}: train, {options.Epochs} epochs, {options.TrainLimit} images, seed {seed}");
        var (code, error) = await Cli(["train", "--run-id", runId, "--epochs", $"{options.Epochs}", "--train-limit", $"{options.TrainLimit}", "--seed", $"{seed}"]);
        var status = await Status(runId);
        // The run survives its client: the CLI gives up after 60 s without contact (a server silo down, a gateway gone).
        int attaches = 0;
        while (status?.GetProperty("state").GetString() == "running" && attaches++ < 3)
        {
            SoakCluster.Log($"{runId}: train exited {code} with the run still running; watch");
            (int watchCode, string? watchError) = await Cli(["watch", runId]);
            error ??= watchCode != 0 ? watchError : null;
            status = await Status(runId);
        }
        if (status?.GetProperty("state").GetString() == "running")
        {
            // Still running after every re-attach: cancelled, so that the next run has the cluster to itself.
            await Cli(["cancel", runId]);
            status = await Status(runId);
        }
        _runInFlight = null;
        (int Kills, int Exits) during;
        lock (_byRun) during = _byRun.GetValueOrDefault(runId);
        double seconds = clock.Elapsed.TotalSeconds;
        string reference = Reference(seed);
        string state = status?.GetProperty("state").GetString() ?? "unknown";
        var epochs = status?.GetProperty("epochs").EnumerateArray().ToArray() ?? [];
        string? sha = epochs.Length > 0 ? epochs[^1].GetProperty("parameterSha256").GetString() : null;
        var events = (status?.GetProperty("events").EnumerateArray() ?? Enumerable.Empty<JsonElement>())
            .GroupBy(e => e.GetProperty("kind").GetString() ?? "?").ToDictionary(g => g.Key, g => g.Count());
        if (status?.TryGetProperty("error", out var e) == true && e.ValueKind == JsonValueKind.String) error = e.GetString();
        bool complete = state == "completed" && epochs.Length == options.Epochs;
        SoakCluster.Log($"{runId}: {state}, {epochs.Length}/{options.Epochs} epochs in {seconds:F0} s, train exit {code}, {(sha == reference ? "bits = LocalTrainer" : $"bits DIFFER: {sha} vs {reference}")}");
        return new SoakRun("run", runId, seed, code, attaches, state, epochs.Length, options.Epochs, Math.Round(seconds, 1), during.Kills, during.Exits,
            events, sha, reference, complete && sha == reference, complete ? null : error);
    }

    private int Count(string kind)
    {
        lock (_events) return _events.Count(e => e.Kind == kind);
    }

    /// <summary>LocalTrainer on the same spec as the CLI's (the preset with the same flags) and data: the bits every run must end with.</summary>
    private string Reference(long seed)
    {
        var spec = Presets.PyTorchMlp with { Epochs = options.Epochs, TrainLimit = options.TrainLimit, Seed = seed };
        using var local = new LocalTrainer(spec, train);
        for (int e = 0; e < spec.Epochs; e++)
        {
            cancel.ThrowIfCancellationRequested();
            local.TrainEpoch(e);
        }
        return ParameterHash.Sha256(local.Parameters);
    }

    /// <summary>This build's CLI against the cluster; a run that does not end within 30 min is killed (the run itself goes on).</summary>
    private async Task<(int Code, string? Error)> Cli(string[] args)
    {
        try
        {
            var result = await Child.Run("dotnet", [paths.Cli, .. args, .. cluster.CliAddress], [], TimeSpan.FromMinutes(30), cancel);
            return (result.Code, result.Code == 0 ? null : LastLine(result.Error + "\n" + result.Output));
        }
        catch (BenchException e)
        {
            return (-1, e.Message);
        }
    }

    /// <summary>`status RUN --json`, tried a few times (the server silo may just be restarting); null if it never answered.</summary>
    private async Task<JsonElement?> Status(string runId)
    {
        for (int attempt = 0; attempt < 6; attempt++)
        {
            var result = await Child.Run("dotnet", [paths.Cli, "status", runId, "--json", .. cluster.CliAddress], [], TimeSpan.FromMinutes(2), cancel);
            if (result.Code == 0 && result.Output.Split('\n').FirstOrDefault(l => l.StartsWith('{')) is { } line)
                return JsonDocument.Parse(line).RootElement.Clone();
            await Task.Delay(TimeSpan.FromSeconds(5), cancel);
        }
        return null;
    }

    private static string LastLine(string text) => text.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).LastOrDefault() ?? "";

    private async Task<SoakSnapshot> Take(string label)
    {
        // A silo being started again has no figures yet: wait (up to 3 min) until the keeper has every silo up.
        for (int i = 0; i < 180 && !cluster.SiloPids().All(SoakFigures.IsRunning); i++) await Task.Delay(TimeSpan.FromSeconds(1), cancel);
        var pids = cluster.SiloPids();
        var processes = Enumerable.Range(0, cluster.Roles.Length)
            .Select(i => SoakFigures.Process($"silo-{i}", cluster.Roles[i], pids[i], Volatile.Read(ref _killsPerSlot[i]), Volatile.Read(ref _exitsPerSlot[i])))
            .Append(SoakFigures.Process("redis-server", "redis", cluster.RedisPid(), 0, 0))
            .ToArray();
        var redis = await SoakFigures.Redis(cluster, cancel);
        var state = SoakFigures.Folder(cluster.State, exclude: "redis", logs: cluster.Roles.Length);
        var data = SoakFigures.Folder(Path.Combine(work, "data"), exclude: "mnist", logs: 0);
        var snapshot = new SoakSnapshot("snapshot", label, Math.Round(_clock.Elapsed.TotalSeconds, 1), _runs.Count, Count("kill"), Count("exit"), SoakFigures.LoadAverage(),
            processes, redis, state, data);
        Emit(snapshot);
        return snapshot;
    }

    private void Emit(object row)
    {
        if (options.Json) Console.WriteLine(JsonSerializer.Serialize(row, row.GetType(), SoakFigures.JsonOptions));
    }

    private static readonly string[] Roles = ["server", "worker", "all"];

    /// <summary>
    /// End against warm (after the first run and a settle): the start figures are of silos that have not trained yet
    /// (no parameters, buffers or JIT-compiled code), so growth from start to warm is the first run's working set, not a leak.
    /// </summary>
    private SoakVerdict Judge(SoakSnapshot start, SoakSnapshot warm, SoakSnapshot end, double minutes, double?[] load)
    {
        var findings = new List<string>();
        int samePid = 0;
        // Silo slots killed after the warm figures are new processes at the end: their own figures say nothing about
        // growth, so they are judged only within their role's total (which a young process pulls down, said in the notes).
        foreach (var w in warm.Processes)
        {
            var e = end.Processes.Single(p => p.Slot == w.Slot);
            if (e.RssKb is null) { findings.Add($"{w.Slot} not running at the end"); continue; }
            if (e.Pid != w.Pid) continue;
            samePid++;
            Check(findings, $"{w.Slot} rss", w.RssKb, e.RssKb, RssGrowthLimit);
            Check(findings, $"{w.Slot} fds", w.Fds, e.Fds, FdGrowthLimit);
            Check(findings, $"{w.Slot} threads", w.Threads, e.Threads, ThreadGrowthLimit);
        }
        foreach (var role in Roles)
        {
            var (wr, er) = (Total(warm, role), Total(end, role));
            if (wr.Count == 0) continue;
            Check(findings, $"{role} silos' total rss", wr.Rss, er.Rss, RssGrowthLimit);
            Check(findings, $"{role} silos' total fds", wr.Fds, er.Fds, v => FdGrowthLimit(v) * wr.Count);
            Check(findings, $"{role} silos' total threads", wr.Threads, er.Threads, v => ThreadGrowthLimit(v) * wr.Count);
        }
        if (end.Redis.OtherKeys > warm.Redis.OtherKeys) findings.Add($"redis keys of no run {warm.Redis.OtherKeys} -> {end.Redis.OtherKeys}");
        if (end.Redis.KeysPerRunMax > warm.Redis.KeysPerRunMax) findings.Add($"redis keys per run up to {end.Redis.KeysPerRunMax} (run 1: {warm.Redis.KeysPerRunMax})");
        // The retention keeps K finished runs, plus the one running and one evicted whose deletion (done beside the
        // list's calls) may not have ended yet: Redis holds at most that many runs' keys and memory.
        long keep = options.KeepFinishedRuns + 2;
        if (end.Redis.RunKeys > keep * (warm.Redis.KeysPerRunMax ?? 0))
            findings.Add($"redis keys of runs {end.Redis.RunKeys}, over {keep} runs' worth ({warm.Redis.KeysPerRunMax} each)");
        if (start.Redis.UsedMemoryBytes is { } m0 && warm.Redis.UsedMemoryBytes is { } m1 && end.Redis.UsedMemoryBytes is { } m2
            && m2 > m1 + keep * Math.Max(m1 - m0, 0) + m1 / 4)
            findings.Add($"redis used_memory {m1} -> {m2} bytes, over {keep} runs' worth ({m1 - m0} bytes each, the first run's)");
        if (end.State.Files > warm.State.Files) findings.Add($"state folder files {warm.State.Files} -> {end.State.Files}");
        if (end.Data.Files > warm.Data.Files) findings.Add($"files written under the data folder {warm.Data.Files} -> {end.Data.Files}");
        var bad = _runs.Where(r => !r.BitIdentical).Select(r => $"{r.RunId} ({r.State}, {r.Epochs}/{r.EpochsWanted} epochs{(r.State == "completed" && r.Epochs == r.EpochsWanted ? ", bits differ" : "")}{(r.Error is null ? "" : ": " + r.Error)})").ToArray();
        SoakSiloEvent[] exits;
        lock (_events) exits = [.. _events.Where(e => e.Kind == "exit")];
        string[] exitText = [.. exits.GroupBy(e => (e.Slot, e.Role)).Select(g => $"silo-{g.Key.Slot} ({g.Key.Role}) {g.Count()}x, last: {g.Last().Reason}")];
        string text = $"soak ran {minutes:F1} min ({options.Minutes:0.#} asked), {_runs.Count} runs, {Count("kill")} kills: "
            + (findings.Count == 0 ? "flat (end within the limits of warm)" : "NOT flat: " + string.Join("; ", findings))
            + $" [judged per process: {samePid} of {warm.Processes.Length} kept their pid from warm to end; the others by role totals]"
            + (exits.Length == 0 ? "; no silo exited unless killed" : $"; {exits.Length} silo exits nobody asked for: {string.Join("; ", exitText)}")
            + "; " + (bad.Length == 0 ? $"all {_runs.Count} runs completed bit-identical to LocalTrainer" : $"{_runs.Count - bad.Length} of {_runs.Count} runs bit-identical; not: {string.Join(", ", bad)}");
        return new SoakVerdict("verdict", Math.Round(minutes, 1), options.Minutes, options.KillEverySeconds, _runs.Count, _runs.Count(r => r.State == "completed"),
            _runs.Count(r => r.BitIdentical), Count("kill"), exits.Length, findings.Count == 0, bad.Length == 0, [.. findings], exitText, bad, load, text);
    }

    // Limits of end over warm. .NET's heaps and the thread pool breathe with timing (collections, injected threads), and a
    // loaded 2-core machine makes them breathe more; a leak per run or per kill adds up over tens of them and goes past these.
    private static long RssGrowthLimit(long warmKb) => Math.Max(warmKb / 4, 32 * 1024);
    private static long FdGrowthLimit(long warm) => Math.Max(warm / 10, 16);
    private static long ThreadGrowthLimit(long warm) => Math.Max(warm / 5, 8);

    private static void Check(List<string> findings, string what, long? warm, long? end, Func<long, long> limit)
    {
        if (warm is { } w && end is { } e && e > w + limit(w)) findings.Add($"{what} {w} -> {e}");
    }

    /// <summary>A role's totals; null where a silo of the role was not running (a total without it would look like a drop).</summary>
    private static (int Count, long? Rss, long? Fds, long? Threads) Total(SoakSnapshot s, string role)
    {
        var p = s.Processes.Where(x => x.Role == role).ToArray();
        bool all = p.All(x => x.RssKb is not null);
        return (p.Length, all ? p.Sum(x => x.RssKb!.Value) : null, all ? p.Sum(x => (long)x.Fds!.Value) : null, all ? p.Sum(x => (long)x.Threads!.Value) : null);
    }

    /// <summary>The table: start, warm, end and end - warm for every silo slot, role, Redis and the folders; then the runs and the verdict.</summary>
    private void Print(SoakSnapshot start, SoakSnapshot warm, SoakSnapshot end, SoakVerdict verdict)
    {
        var t = Table;
        t.WriteLine();
        t.WriteLine($"{"",-30} {"start",12} {"warm",12} {"end",12} {"end-warm",10}  note");
        void Row(string what, long? s, long? w, long? e, string note = "") =>
            t.WriteLine($"{what,-30} {Show(s),12} {Show(w),12} {Show(e),12} {(w is { } a && e is { } b ? (b - a).ToString("+#;-#;0", CultureInfo.InvariantCulture) : "-"),10}  {note}");
        foreach (var p in warm.Processes)
        {
            var (s, e) = (start.Processes.Single(x => x.Slot == p.Slot), end.Processes.Single(x => x.Slot == p.Slot));
            string name = $"{p.Slot} ({p.Role})";
            string note = e.Kills + e.Exits > 0
                ? $"killed {e.Kills}x, exited {e.Exits}x; pid {s.Pid} -> {e.Pid}" + (e.Pid != p.Pid ? ": a new process since warm" : "")
                : $"pid {e.Pid}";
            Row($"{name} rss KB", s.RssKb, p.RssKb, e.RssKb, note);
            Row($"{name} fds", s.Fds, p.Fds, e.Fds);
            Row($"{name} threads", s.Threads, p.Threads, e.Threads);
        }
        foreach (var role in Roles)
        {
            var (s, w, e) = (Total(start, role), Total(warm, role), Total(end, role));
            if (w.Count == 0) continue;
            Row($"{role} total rss KB", s.Rss, w.Rss, e.Rss, $"{w.Count} silos, per-role total: killed silos are younger processes");
            Row($"{role} total fds", s.Fds, w.Fds, e.Fds);
            Row($"{role} total threads", s.Threads, w.Threads, e.Threads);
        }
        Row("redis keys (DBSIZE)", start.Redis.Keys, warm.Redis.Keys, end.Redis.Keys, $"{end.Redis.RunKeys} of runs, {end.Redis.DirectoryKeys} grain directory");
        Row("redis keys of no run", start.Redis.OtherKeys, warm.Redis.OtherKeys, end.Redis.OtherKeys, "membership, registry");
        Row("redis keys per run (max)", start.Redis.KeysPerRunMax, warm.Redis.KeysPerRunMax, end.Redis.KeysPerRunMax, $"min {end.Redis.KeysPerRunMin}: a run's state, checkpoints, live directory entries");
        Row("redis used_memory bytes", start.Redis.UsedMemoryBytes, warm.Redis.UsedMemoryBytes, end.Redis.UsedMemoryBytes, $"at most {options.KeepFinishedRuns} finished runs kept (--keep-finished-runs)");
        Row("redis membership rows", start.Redis.MembershipRows, warm.Redis.MembershipRows, end.Redis.MembershipRows, "one per silo start; Orleans keeps dead silos' rows");
        Row("redis append-only bytes", start.Redis.AofBytes, warm.Redis.AofBytes, end.Redis.AofBytes, "every checkpoint is appended; rewritten past 64 MB");
        Row("state folder files", start.State.Files, warm.State.Files, end.State.Files, "cluster.sh's state without redis/");
        Row("state folder bytes", start.State.Bytes, warm.State.Bytes, end.State.Bytes, "silo logs are appended to");
        for (int i = 0; i < end.State.SiloLogBytes.Length; i++)
            Row($"silo-{i}.log bytes", start.State.SiloLogBytes[i], warm.State.SiloLogBytes[i], end.State.SiloLogBytes[i]);
        Row("data folder files written", start.Data.Files, warm.Data.Files, end.Data.Files, "beside mnist/");
        t.WriteLine();
        t.WriteLine($"{"run",-9} {"seed",4} {"exit",4} {"state",-10} {"epochs",7} {"seconds",7} {"kills",5} {"exits",5}  {"sha256",-12} {"reference",-12} same  events");
        foreach (var r in _runs)
            t.WriteLine($"{r.RunId,-9} {r.Seed,4} {r.ExitCode,4} {r.State,-10} {$"{r.Epochs}/{r.EpochsWanted}",7} {r.Seconds,7:F0} {r.KillsDuring,5} {r.ExitsDuring,5}  {Short(r.ParameterSha256),-12} {Short(r.Reference),-12} {(r.BitIdentical ? "yes " : "NO  ")}  "
                + string.Join(", ", r.Events.Where(e => e.Key is not ("started" or "completed")).Select(e => $"{e.Key} {e.Value}")));
        lock (_events)
            foreach (var k in _events)
                t.WriteLine($"{(k.Kind == "kill" ? "kill" : "EXIT"),-4} at {k.AtSeconds,5:F0} s: silo-{k.Slot} ({k.Role}) pid {k.OldPid} -> {k.NewPid}, during {k.Run ?? "no run"}, "
                    + $"up again after {k.SecondsToUp:F1} s{(k.Reason is null ? "" : "; why: " + k.Reason)}{(k.Error is null ? "" : "; " + k.Error)}");
        t.WriteLine($"load average (1 min) at start / end: {Show(verdict.LoadAverage[0])} / {Show(verdict.LoadAverage[1])}");
        t.WriteLine("verdict: " + verdict.Text);

        static string Show<T>(T? v) where T : struct => v is { } x ? string.Format(CultureInfo.InvariantCulture, "{0}", x) : "-";
        static string Short(string? sha) => sha is null ? "-" : sha[..12];
    }
}

internal sealed record SoakProcess(string Slot, string Role, int? Pid, int Kills, int Exits, long? RssKb, int? Fds, int? Threads);
internal sealed record SoakRedis(long Keys, long OtherKeys, long RunKeys, long DirectoryKeys, long? KeysPerRunMin, long? KeysPerRunMax, long? UsedMemoryBytes, long? MembershipRows, long AofBytes);
internal sealed record SoakFolder(int Files, long Bytes, long[] SiloLogBytes);
internal sealed record SoakSnapshot(string Kind, string Label, double AtSeconds, int RunsDone, int Kills, int Exits, double? LoadAverage,
    SoakProcess[] Processes, SoakRedis Redis, SoakFolder State, SoakFolder Data);
internal sealed record SoakRun(string Kind, string RunId, long Seed, int ExitCode, int Attaches, string State, int Epochs, int EpochsWanted, double Seconds,
    int KillsDuring, int ExitsDuring, Dictionary<string, int> Events, string? ParameterSha256, string Reference, bool BitIdentical, string? Error);
/// <summary>Kind "kill" (the bench's SIGKILL) or "exit" (a silo found not running that the bench had not killed), and the restart after it.</summary>
internal sealed record SoakSiloEvent(string Kind, double AtSeconds, int Slot, string Role, int? OldPid, int? NewPid, string? Run, double SecondsToUp, string? Reason, string? Error);
internal sealed record SoakVerdict(string Kind, double Minutes, double MinutesAsked, int KillEverySeconds, int Runs, int Completed, int BitIdenticalRuns, int Kills,
    int SiloExits, bool Flat, bool AllBitIdentical, string[] Findings, string[] Exits, string[] RunsNotBitIdentical, double?[] LoadAverage, string Text);

/// <summary>Where the figures come from: /proc for processes, redis-cli for Redis, the file system for the folders.</summary>
internal static partial class SoakFigures
{
    public static readonly JsonSerializerOptions JsonOptions = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    };

    /// <summary>VmRSS and Threads from /proc/PID/status, the entries of /proc/PID/fd; nulls when the process is gone.</summary>
    public static SoakProcess Process(string slot, string role, int? pid, int kills, int exits)
    {
        var none = new SoakProcess(slot, role, pid, kills, exits, null, null, null);
        if (!IsRunning(pid)) return none;
        try
        {
            var status = File.ReadAllLines($"/proc/{pid}/status");
            long Field(string name) => long.Parse(status.Single(l => l.StartsWith(name + ":", StringComparison.Ordinal)).Split(':')[1].Trim().Split(' ')[0], CultureInfo.InvariantCulture);
            return none with { RssKb = Field("VmRSS"), Fds = Directory.GetFileSystemEntries($"/proc/{pid}/fd").Length, Threads = (int)Field("Threads") };
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidOperationException)
        {
            return none;
        }
    }

    /// <summary>The process exists and is not a zombie (a silo whose starter, cluster.sh, has exited may wait unreaped).</summary>
    public static bool IsRunning(int? pid)
    {
        try
        {
            return pid is { } p && File.ReadLines($"/proc/{p}/status").FirstOrDefault(l => l.StartsWith("State:", StringComparison.Ordinal)) is { } state
                && !state.Contains("(zombie)", StringComparison.Ordinal);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    /// <summary>Keys (by run id found in the key), used memory, membership rows and the append-only file's size.</summary>
    public static async Task<SoakRedis> Redis(SoakCluster cluster, CancellationToken cancel)
    {
        var keys = (await Cli(cluster, cancel, "--scan")).Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        var perRun = keys.Select(k => RunIdInKey().Match(k)).Where(m => m.Success).GroupBy(m => m.Groups[1].Value).Select(g => (long)g.Count()).ToArray();
        long? used = null;
        foreach (var line in (await Cli(cluster, cancel, "INFO", "memory")).Split('\n'))
            if (line.StartsWith("used_memory:", StringComparison.Ordinal)) used = long.Parse(line["used_memory:".Length..].Trim(), CultureInfo.InvariantCulture);
        long? members = null;
        if (keys.FirstOrDefault(k => k.Contains("/members/", StringComparison.Ordinal)) is { } membersKey
            && long.TryParse((await Cli(cluster, cancel, "HLEN", membersKey)).Trim(), out long rows)) members = rows;
        return new SoakRedis(keys.Length, keys.Length - perRun.Sum(), perRun.Sum(), keys.Count(k => k.Contains("/directory/", StringComparison.Ordinal)),
            perRun.Length > 0 ? perRun.Min() : null, perRun.Length > 0 ? perRun.Max() : null, used, members,
            Folder(Path.Combine(cluster.State, "redis"), exclude: null, logs: 0).Bytes);
    }

    private static async Task<string> Cli(SoakCluster cluster, CancellationToken cancel, params string[] args)
    {
        string[] hostPort = cluster.Redis.Split(':');
        // The password through the environment (REDISCLI_AUTH), never on a command line that ps shows.
        var env = new Dictionary<string, string> { ["REDISCLI_AUTH"] = File.ReadAllText(cluster.PasswordFile).Trim() };
        var result = await Child.Run("redis-cli", ["-h", hostPort[0], "-p", hostPort[1], .. args], env, TimeSpan.FromSeconds(60), cancel);
        if (result.Code != 0) throw new BenchException($"redis-cli {string.Join(' ', args)} failed (exit {result.Code}): {result.Error.Trim()}");
        return result.Output;
    }

    [GeneratedRegex("/(soak-[0-9]+)(/|$)")]
    private static partial Regex RunIdInKey();

    /// <summary>Files and bytes under a folder (without the top-level entry <paramref name="exclude"/>), and silo-0..N-1's log sizes.</summary>
    public static SoakFolder Folder(string dir, string? exclude, int logs)
    {
        var files = Directory.Exists(dir)
            ? Directory.EnumerateFileSystemEntries(dir).Where(e => Path.GetFileName(e) != exclude)
                .SelectMany(e => Directory.Exists(e) && !File.GetAttributes(e).HasFlag(FileAttributes.ReparsePoint)
                    ? Directory.EnumerateFiles(e, "*", SearchOption.AllDirectories) : File.Exists(e) ? new[] { e } : Array.Empty<string>())
                .Select(f => new FileInfo(f)).ToArray()
            : [];
        long LogBytes(int i) => new FileInfo(Path.Combine(dir, $"silo-{i}.log")) is { Exists: true } f ? f.Length : 0;
        return new SoakFolder(files.Length, files.Sum(f => f.Length), [.. Enumerable.Range(0, logs).Select(LogBytes)]);
    }

    public static double? LoadAverage()
    {
        try { return double.Parse(File.ReadAllText("/proc/loadavg").Split(' ')[0], CultureInfo.InvariantCulture); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException) { return null; }
    }
}
