using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace Backprop.Bench;

/// <summary>A child process run to its end, or killed with everything it started on timeout or cancellation.</summary>
internal static class Child
{
    public sealed record Result(int Code, string Output, string Error);

    public static async Task<Result> Run(string program, string[] args, Dictionary<string, string> env, TimeSpan limit, CancellationToken cancel)
    {
        var psi = new ProcessStartInfo(program) { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        foreach (var (k, v) in env) psi.Environment[k] = v;
        using var process = Process.Start(psi) ?? throw new BenchException($"cannot start {program}");
        process.StandardInput.Close();
        var stdout = process.StandardOutput.ReadToEndAsync(CancellationToken.None);
        var stderr = process.StandardError.ReadToEndAsync(CancellationToken.None);
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancel);
        timeout.CancelAfter(limit);
        try
        {
            await process.WaitForExitAsync(timeout.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync(CancellationToken.None);
            cancel.ThrowIfCancellationRequested();
            throw new BenchException($"{Path.GetFileName(args.FirstOrDefault() ?? program)} {string.Join(' ', args.Skip(1).Take(2))} did not finish within {limit.TotalMinutes:F0} min; killed");
        }
        return new Result(process.ExitCode, await stdout, await stderr);
    }
}

/// <summary>
/// N silo processes on loopback (127.0.0.1 only), started with deploy/local/cluster.sh from this build's silo, with
/// their state (pids, logs) in the bench's temporary folder and a cluster id of their own, so that they never meet a
/// user's cluster. Disposing stops them (cluster.sh stop: SIGTERM, SIGKILL after 15 s; then any pid left is killed).
/// </summary>
internal sealed class LocalCluster : IAsyncDisposable
{
    private readonly Dictionary<string, string> _env;
    private readonly string _script, _state;

    private LocalCluster(string script, string state, Dictionary<string, string> env, string clusterId, string gateways)
    {
        (_script, _state, _env, ClusterId, Gateways) = (script, state, env, clusterId, gateways);
    }

    public string ClusterId { get; }
    public string Gateways { get; }

    public static async Task<LocalCluster> Start(string script, string state, string siloDll, string dataDir, int silos, CancellationToken cancel)
    {
        // cluster.sh gives silo i the ports P+i and G+i: two ranges of free loopback ports that do not overlap.
        var taken = new HashSet<int>();
        int siloPort = FreePorts(silos, taken), gatewayPort = FreePorts(silos, taken);
        var env = new Dictionary<string, string>
        {
            ["BACKPROP_STATE"] = state,
            ["BACKPROP_SILO_DLL"] = siloDll,
            ["BACKPROP_WORKER_THREADS"] = "1",   // passed on to the silos by cluster.sh's environment
        };
        string clusterId = $"backprop-bench-{Environment.ProcessId}";
        var cluster = new LocalCluster(script, state, env, clusterId,
            string.Join(',', Enumerable.Range(gatewayPort, silos).Select(p => $"127.0.0.1:{p}")));
        Console.Error.WriteLine($"[{DateTime.Now:HH:mm:ss}] processes: starting {silos} silos (cluster {clusterId}, silo ports {siloPort}+, gateways {cluster.Gateways})");
        try
        {
            var result = await Child.Run("bash", [script, "start", "--silos", $"{silos}", "--silo-port", $"{siloPort}", "--gateway-port", $"{gatewayPort}",
                "--cluster-id", clusterId, "--data-dir", dataDir], env, TimeSpan.FromMinutes(3), cancel);
            if (result.Code != 0) throw new BenchException($"cluster.sh start failed (exit {result.Code}): {result.Error.Trim()} {result.Output.Trim()}");
        }
        catch
        {
            await cluster.DisposeAsync();
            throw;
        }
        return cluster;
    }

    public async ValueTask DisposeAsync()
    {
        // Read before stopping: cluster.sh removes the pids file once it has stopped them.
        string pidsFile = Path.Combine(_state, "pids");
        var pids = File.Exists(pidsFile) ? File.ReadAllLines(pidsFile).Where(l => l.Length > 0).Select(int.Parse).ToList() : [];
        bool stopped = false;
        try
        {
            var result = await Child.Run("bash", [_script, "stop"], _env, TimeSpan.FromSeconds(60), CancellationToken.None);
            stopped = result.Code == 0;
            Console.Error.WriteLine($"[{DateTime.Now:HH:mm:ss}] processes: {(stopped ? "silos stopped" : $"cluster.sh stop failed (exit {result.Code}): {result.Error.Trim()}")}");
        }
        catch (Exception e) when (e is BenchException or IOException or System.ComponentModel.Win32Exception)
        {
            Console.Error.WriteLine($"processes: cluster.sh stop failed ({e.Message})");
        }
        if (stopped) return;
        // The script could not stop them: kill the silos it started (by pid, and only if still a dotnet process).
        foreach (int pid in pids)
        {
            try
            {
                using var p = Process.GetProcessById(pid);
                if (!p.HasExited && p.ProcessName == "dotnet")
                {
                    Console.Error.WriteLine($"processes: killing silo pid {pid}");
                    p.Kill();
                }
            }
            catch (Exception e) when (e is ArgumentException or InvalidOperationException or System.ComponentModel.Win32Exception)
            {
                // gone already
            }
        }
    }

    /// <summary>The first of <paramref name="count"/> consecutive loopback ports that are free now and not in <paramref name="taken"/>.</summary>
    private static int FreePorts(int count, HashSet<int> taken)
    {
        while (true)
        {
            using var probe = new TcpListener(IPAddress.Loopback, 0);
            probe.Start();
            int first = ((IPEndPoint)probe.LocalEndpoint).Port;
            probe.Stop();
            var range = Enumerable.Range(first, count).ToArray();
            if (range[^1] > 65535 || range.Any(taken.Contains) || !range.All(IsFree)) continue;
            taken.UnionWith(range);
            return first;
        }
    }

    private static bool IsFree(int port)
    {
        try
        {
            using var listener = new TcpListener(IPAddress.Loopback, port);
            listener.Start();
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }
}
