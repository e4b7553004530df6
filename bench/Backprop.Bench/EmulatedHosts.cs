using System.Diagnostics;

namespace Backprop.Bench;

/// <summary>
/// N emulated hosts on this machine (root only): a Linux bridge, one network namespace per host with a veth pair to
/// the bridge and the address 198.18.0.(i+1)/24 (RFC 2544's benchmarking range, never routed anywhere), every link
/// capped with tc tbf at the given rate in both directions (egress inside the namespace and on the bridge side:
/// netem is not available here, so links get a rate but no delay), and one silo process per namespace (localhost
/// clustering around host 0's silo). All hosts share the machine's cores: this measures the wire, not compute
/// scaling. Names carry the bench's pid; disposing kills the silos and deletes the namespaces and the bridge, also
/// after an error or Ctrl+C.
/// </summary>
internal sealed class EmulatedHosts : IAsyncDisposable
{
    private const int SiloPort = 11111, GatewayPort = 30000;
    private readonly string _prefix = $"bp{Environment.ProcessId % 100000}";
    private readonly List<Process> _silos = [];
    private readonly int _hosts;
    private bool _bridge;
    private readonly List<string> _namespaces = [];

    private EmulatedHosts(int hosts, string clusterId) => (_hosts, ClusterId) = (hosts, clusterId);

    public string ClusterId { get; }
    public string Gateway => $"{Address(0)}:{GatewayPort}";
    public string Namespace(int host) => $"{_prefix}h{host}";
    public static string Address(int host) => $"198.18.0.{host + 1}";

    public static async Task<EmulatedHosts> Start(int hosts, string rate, string siloDll, string dataDir, string logDir, CancellationToken cancel)
    {
        if (!Environment.IsPrivilegedProcess) throw new BenchException("mode hosts needs root (network namespaces, veth pairs, tc); run the bench as root or leave --hosts out");
        if (hosts is < 2 or > 64) throw new BenchException($"--hosts: {hosts} is outside 2..64");
        var emulated = new EmulatedHosts(hosts, $"backprop-hosts-{Environment.ProcessId}");
        try
        {
            await emulated.Network(rate, cancel);
            for (int i = 0; i < hosts; i++) emulated.StartSilo(i, siloDll, dataDir, logDir);
            for (int i = 0; i < hosts; i++) await WaitUp(Path.Combine(logDir, $"host-{i}.log"), $"silo-{i} up", emulated._silos[i], cancel);
            Console.Error.WriteLine($"[{DateTime.Now:HH:mm:ss}] hosts: {hosts} silos up on {Address(0)}..{Address(hosts - 1)}, links {rate} each way");
            return emulated;
        }
        catch
        {
            await emulated.DisposeAsync();
            throw;
        }
    }

    /// <summary>Bytes each host has sent over its link so far: what the bridge's end of its veth pair received.</summary>
    public long[] SentBytes() => [.. Enumerable.Range(0, _hosts).Select(i => long.Parse(File.ReadAllText($"/sys/class/net/{_prefix}v{i}/statistics/rx_bytes").Trim()))];

    /// <summary>The command line that runs <paramref name="args"/> with dotnet inside host 0's namespace (where the CLI runs).</summary>
    public (string Program, string[] Args) OnHost0(string[] args) => ("ip", ["netns", "exec", Namespace(0), "dotnet", .. args]);

    private async Task Network(string rate, CancellationToken cancel)
    {
        string bridge = $"{_prefix}br";
        await Run(cancel, "ip", "link", "add", bridge, "type", "bridge");
        _bridge = true;
        await Run(cancel, "ip", "link", "set", bridge, "up");
        for (int i = 0; i < _hosts; i++)
        {
            string ns = Namespace(i), veth = $"{_prefix}v{i}";
            await Run(cancel, "ip", "netns", "add", ns);
            _namespaces.Add(ns);
            await Run(cancel, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns);
            await Run(cancel, "ip", "link", "set", veth, "master", bridge, "up");
            await Run(cancel, "ip", "netns", "exec", ns, "ip", "addr", "add", $"{Address(i)}/24", "dev", "eth0");
            await Run(cancel, "ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up");
            await Run(cancel, "ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up");
            // What the host sends (inside its namespace) and what it receives (the bridge's side of its link).
            await Run(cancel, "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms");
            await Run(cancel, "tc", "qdisc", "add", "dev", veth, "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms");
        }
    }

    private void StartSilo(int host, string siloDll, string dataDir, string logDir)
    {
        var psi = new ProcessStartInfo("ip") { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
        string[] args =
        [
            "netns", "exec", Namespace(host), "dotnet", siloDll, "--host", Address(host), "--silo-port", $"{SiloPort}", "--gateway-port", $"{GatewayPort}",
            "--cluster-id", ClusterId, "--data-dir", dataDir, "--name", $"silo-{host}", "--worker-threads", "1",
            .. host == 0 ? Array.Empty<string>() : ["--primary", $"{Address(0)}:{SiloPort}"],
        ];
        foreach (var a in args) psi.ArgumentList.Add(a);
        var process = Process.Start(psi) ?? throw new BenchException($"cannot start the silo of host {host}");
        process.StandardInput.Close();
        _silos.Add(process);
        var log = new StreamWriter(Path.Combine(logDir, $"host-{host}.log")) { AutoFlush = true };
        var gate = new object();
        void Write(string? line) { if (line is null) return; lock (gate) log.WriteLine(line); }
        process.OutputDataReceived += (_, e) => Write(e.Data);
        process.ErrorDataReceived += (_, e) => Write(e.Data);
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        process.Exited += (_, _) => { lock (gate) log.Dispose(); };
        process.EnableRaisingEvents = true;
    }

    private static async Task WaitUp(string log, string marker, Process silo, CancellationToken cancel)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            cancel.ThrowIfCancellationRequested();
            string text;
            try
            {
                using var reader = new StreamReader(new FileStream(log, FileMode.Open, FileAccess.Read, FileShare.ReadWrite));
                text = await reader.ReadToEndAsync(cancel);
            }
            catch (IOException)
            {
                text = "";
            }
            if (text.Contains(marker)) return;
            if (silo.HasExited) throw new BenchException($"the silo logging to {log} exited ({silo.ExitCode}): {text.Split('\n').TakeLast(3).Aggregate("", (a, b) => a + " | " + b)}");
            if (clock.Elapsed > TimeSpan.FromMinutes(3)) throw new BenchException($"no '{marker}' in {log} after 3 minutes");
            await Task.Delay(200, cancel);
        }
    }

    private static async Task Run(CancellationToken cancel, string program, params string[] args)
    {
        var result = await Child.Run(program, args, [], TimeSpan.FromSeconds(30), cancel);
        if (result.Code != 0) throw new BenchException($"{program} {string.Join(' ', args)}: exit {result.Code}: {result.Error.Trim()}");
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var silo in _silos)
        {
            try
            {
                if (!silo.HasExited) silo.Kill(entireProcessTree: true);
                await silo.WaitForExitAsync(CancellationToken.None);
            }
            catch (Exception e) when (e is InvalidOperationException or System.ComponentModel.Win32Exception)
            {
                // gone already
            }
            silo.Dispose();
        }
        // Deleting a namespace deletes its end of the veth pair, and with it the bridge's end.
        foreach (var ns in _namespaces) await Quietly("ip", "netns", "del", ns);
        if (_bridge) await Quietly("ip", "link", "del", $"{_prefix}br");
        Console.Error.WriteLine($"[{DateTime.Now:HH:mm:ss}] hosts: silos stopped, namespaces and bridge removed");
    }

    private static async Task Quietly(string program, params string[] args)
    {
        try
        {
            var result = await Child.Run(program, args, [], TimeSpan.FromSeconds(30), CancellationToken.None);
            if (result.Code != 0) Console.Error.WriteLine($"hosts: {program} {string.Join(' ', args)}: exit {result.Code}: {result.Error.Trim()}");
        }
        catch (Exception e) when (e is BenchException or IOException or System.ComponentModel.Win32Exception)
        {
            Console.Error.WriteLine($"hosts: {program} {string.Join(' ', args)} failed: {e.Message}");
        }
    }
}
