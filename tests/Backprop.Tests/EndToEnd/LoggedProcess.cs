using System.Diagnostics;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// A process of a test (a silo, the CLI, redis-server), started directly or inside a network namespace, with its
/// stdout and stderr lines collected in one list that a test can wait on. Killed on dispose if still running.
/// </summary>
public sealed class LoggedProcess : IDisposable
{
    private readonly Process _process;
    private readonly List<string> _lines = [];
    private bool _finished;

    private LoggedProcess(string program, IEnumerable<string> args, Dictionary<string, string>? env)
    {
        var psi = new ProcessStartInfo(program) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        foreach (var (k, v) in env ?? []) psi.Environment[k] = v;
        _process = new Process { StartInfo = psi };
        _process.OutputDataReceived += (_, e) => Add(e.Data);
        _process.ErrorDataReceived += (_, e) => Add(e.Data);
        _process.Start();
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
    }

    private void Add(string? line)
    {
        if (line is null) return;
        lock (_lines)
        {
            _lines.Add(line);
            Monitor.PulseAll(_lines);
        }
    }

    public static string SiloDll => Path.Combine(Processes.Root, "src/Silo/bin", Processes.Configuration, "net10.0/Backprop.Silo.dll");
    public static string CliDll => Path.Combine(Processes.Root, "src/Client/bin", Processes.Configuration, "net10.0/backprop.dll");

    /// <summary>Starts <paramref name="program"/>; inside network namespace <paramref name="netns"/> when one is given.</summary>
    public static LoggedProcess Start(string program, IEnumerable<string> args, Dictionary<string, string>? env = null, string? netns = null) =>
        netns is null ? new(program, args, env) : new("ip", ["netns", "exec", netns, program, .. args], env);

    public static LoggedProcess Silo(IEnumerable<string> args, Dictionary<string, string>? env = null, string? netns = null) =>
        Start("dotnet", [SiloDll, .. args], env, netns);

    public static LoggedProcess Cli(IEnumerable<string> args, Dictionary<string, string>? env = null, string? netns = null) =>
        Start("dotnet", [CliDll, .. args], env, netns);

    /// <summary>
    /// redis-server with <paramref name="args"/> (no persistence, its files in <paramref name="dir"/>), returned once it
    /// logs that it accepts connections.
    /// </summary>
    public static LoggedProcess Redis(string dir, IEnumerable<string> args, string? netns = null)
    {
        Directory.CreateDirectory(dir);
        var redis = Start("redis-server", ["--dir", dir, "--save", "", "--appendonly", "no", .. args], netns: netns);
        redis.WaitForLine(l => l.Contains("Ready to accept connections"), TimeSpan.FromSeconds(60));
        return redis;
    }

    public string Output
    {
        get { lock (_lines) return string.Join('\n', _lines); }
    }

    /// <summary>Blocks until a line matches (woken by each new line); throws with the output when the process ends first or after <paramref name="limit"/>.</summary>
    public string WaitForLine(Func<string, bool> match, TimeSpan limit)
    {
        var deadline = DateTime.UtcNow + limit;
        int seen = 0;
        for (bool drained = false; ; )
        {
            lock (_lines)
            {
                for (; seen < _lines.Count; seen++)
                    if (match(_lines[seen])) return _lines[seen];
            }
            if (drained || DateTime.UtcNow >= deadline)
                throw new TimeoutException($"no matching line ({(drained ? $"exited with {_process.ExitCode}" : "still running")}); output:\n{Output}");
            if (_process.HasExited)
            {
                _process.WaitForExit();   // until the redirected streams are read to their end; then look once more
                drained = true;
                continue;
            }
            lock (_lines)
            {
                // Woken by the next line; at the latest after a second, to notice that the process has exited.
                var left = deadline - DateTime.UtcNow;
                if (seen == _lines.Count && left > TimeSpan.Zero) Monitor.Wait(_lines, left < TimeSpan.FromSeconds(1) ? left : TimeSpan.FromSeconds(1));
            }
        }
    }

    /// <summary>SIGTERM, as Kubernetes and compose stop a container.</summary>
    public void Terminate()
    {
        using var kill = Process.Start("kill", ["-TERM", _process.Id.ToString()])!;
        kill.WaitForExit();
    }

    /// <summary>Waits for the process to exit (killing it after <paramref name="limit"/>, then failing); its exit code and output.</summary>
    public Processes.Result Finish(TimeSpan limit)
    {
        if (!_process.WaitForExit(limit))
        {
            _process.Kill(entireProcessTree: true);
            _process.WaitForExit();
            throw new TimeoutException($"did not exit within {limit.TotalSeconds:F0} s; output:\n{Output}");
        }
        _process.WaitForExit();   // drains the redirected streams
        _finished = true;
        return new Processes.Result(_process.ExitCode, Output, Output);
    }

    public void Dispose()
    {
        if (!_finished && !_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
            _process.WaitForExit();
        }
        _process.Dispose();
    }
}
