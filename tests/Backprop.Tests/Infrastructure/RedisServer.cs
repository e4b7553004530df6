using System.Diagnostics;
using System.Net.Sockets;
using Backprop.Grains.Hosting;

namespace Backprop.Tests.Infrastructure;

/// <summary>
/// A real redis-server on a free loopback port, in a temporary directory, for as long as this object lives.
/// Ready when it answers PING; stopped (and its directory removed) on dispose. With a password, it requires AUTH
/// (requirepass) of every client.
/// </summary>
public sealed class RedisServer : IDisposable
{
    private readonly Process _process;
    private readonly string _dir = Directory.CreateTempSubdirectory("redis-").FullName;

    public int Port { get; } = LocalClustering.FreePort();
    public string Address => $"127.0.0.1:{Port}";

    private readonly string? _password;

    public RedisServer(string? password = null)
    {
        _password = password;
        var psi = new ProcessStartInfo("redis-server") { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = _dir };
        foreach (var a in new[] { "--bind", "127.0.0.1", "--port", Port.ToString(), "--dir", _dir, "--save", "", "--appendonly", "no" })
            psi.ArgumentList.Add(a);
        if (password is not null) { psi.ArgumentList.Add("--requirepass"); psi.ArgumentList.Add(password); }
        _process = Process.Start(psi) ?? throw new InvalidOperationException("redis-server did not start");
        _process.OutputDataReceived += (_, _) => { };
        _process.ErrorDataReceived += (_, _) => { };
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
        var deadline = Stopwatch.StartNew();
        while (!Pong())
        {
            if (_process.HasExited) throw new InvalidOperationException($"redis-server exited with {_process.ExitCode}");
            if (deadline.Elapsed > TimeSpan.FromSeconds(30)) { Dispose(); throw new TimeoutException("redis-server did not answer PING in 30 s"); }
            // Polls for readiness; the wait between tries bounds the polling rate, it does not stand for readiness.
            Thread.Sleep(20);
        }
    }

    /// <summary>Sends PING (after AUTH, with a password) in Redis' inline protocol; true when the answer is +PONG.</summary>
    private bool Pong()
    {
        try
        {
            using var client = new TcpClient();
            client.Connect("127.0.0.1", Port);
            using var stream = client.GetStream();
            string expected = (_password is null ? "" : "+OK\r\n") + "+PONG\r\n";
            stream.Write(System.Text.Encoding.ASCII.GetBytes((_password is null ? "" : $"AUTH {_password}\r\n") + "PING\r\n"));
            var buffer = new byte[expected.Length];
            int read = 0;
            while (read < buffer.Length && stream.Read(buffer, read, buffer.Length - read) is > 0 and var n) read += n;
            return System.Text.Encoding.ASCII.GetString(buffer, 0, read) == expected;
        }
        catch (SocketException)
        {
            return false;
        }
        catch (IOException)
        {
            return false;
        }
    }

    public void Dispose()
    {
        if (!_process.HasExited)
        {
            _process.Kill();
            _process.WaitForExit();
        }
        _process.Dispose();
        Directory.Delete(_dir, recursive: true);
    }
}
