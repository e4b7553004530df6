using System.Diagnostics;
using System.Text;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// The CLI (`backprop`), or a silo, of this test run's build, started as a user would, with its output collected line by line.
/// </summary>
public sealed class CliProcess
{
    private readonly Process _process;
    private readonly List<string> _stdout = [];
    private readonly StringBuilder _stderr = new();

    private CliProcess(string dll, string[] args, Dictionary<string, string>? env = null)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(dll);
        foreach (var a in args) psi.ArgumentList.Add(a);
        foreach (var (k, v) in env ?? []) psi.Environment[k] = v;
        _process = new Process { StartInfo = psi };
        _process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (_stdout) { _stdout.Add(e.Data); Monitor.PulseAll(_stdout); } };
        _process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (_stderr) _stderr.AppendLine(e.Data); };
        _process.Start();
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
    }

    public static CliProcess Start(params string[] args) =>
        new(Path.Combine(Processes.Root, "src/Client/bin", Processes.Configuration, "net10.0/backprop.dll"), args);

    /// <summary>A silo host, with extra environment variables; stop it with <see cref="Interrupt"/> and <see cref="Finish"/>.</summary>
    public static CliProcess StartSilo(Dictionary<string, string> env, params string[] args) =>
        new(Path.Combine(Processes.Root, "src/Silo/bin", Processes.Configuration, "net10.0/Backprop.Silo.dll"), args, env);

    /// <summary>Blocks until the CLI prints a line that matches (woken by each new line, not by a timer).</summary>
    public string WaitForLine(Func<string, bool> match, TimeSpan limit)
    {
        var deadline = DateTime.UtcNow + limit;
        lock (_stdout)
        {
            for (int seen = 0; ; )
            {
                for (; seen < _stdout.Count; seen++)
                    if (match(_stdout[seen])) return _stdout[seen];
                var left = deadline - DateTime.UtcNow;
                if (left <= TimeSpan.Zero || _process.HasExited && seen == _stdout.Count && !Monitor.Wait(_stdout, 100))
                    throw new TimeoutException($"no matching line; output so far:\n{string.Join('\n', _stdout)}\n{_stderr}");
                Monitor.Wait(_stdout, left);
            }
        }
    }

    /// <summary>
    /// Interrupts the CLI as Ctrl+C does: the CLI cancels on SIGINT and SIGTERM alike. SIGTERM, because a process
    /// started from a non-interactive shell's background job inherits SIGINT ignored, and .NET keeps it ignored.
    /// </summary>
    public void Interrupt()
    {
        using var kill = Process.Start("kill", ["-TERM", _process.Id.ToString()]);
        kill.WaitForExit();
    }

    public Processes.Result Finish(TimeSpan limit)
    {
        if (!_process.WaitForExit(limit))
        {
            _process.Kill(entireProcessTree: true);
            throw new TimeoutException($"the CLI did not finish: {string.Join('\n', _stdout)}\n{_stderr}");
        }
        _process.WaitForExit();   // drains the redirected streams
        string stdout, stderr;
        lock (_stdout) stdout = string.Join('\n', _stdout);
        lock (_stderr) stderr = _stderr.ToString();
        int code = _process.ExitCode;
        _process.Dispose();
        return new Processes.Result(code, stdout + "\n" + stderr, stderr);
    }
}
