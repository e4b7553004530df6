using System.Diagnostics;

namespace Backprop.Tests.EndToEnd;

/// <summary>Runs the CLI and deploy/local/cluster.sh as a user would, with the builds of this test run.</summary>
public static class Processes
{
    public sealed record Result(int Code, string Output, string Error);

    public static readonly string Root = FindRoot();
    public static readonly string Configuration = new DirectoryInfo(AppContext.BaseDirectory).Parent!.Name;

    /// <summary>
    /// The first of <paramref name="count"/> consecutive loopback ports that are free now and not in
    /// <paramref name="taken"/> (which gets them): cluster.sh gives silo i the port P+i, and ports asked
    /// for one by one often come out consecutive, so a silo's P+1 could be another's gateway or Redis.
    /// </summary>
    public static int FreePorts(int count, HashSet<int> taken)
    {
        while (true)
        {
            int first = Backprop.Grains.Hosting.LocalClustering.FreePort();
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
            using var listener = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, port);
            listener.Start();
            return true;
        }
        catch (System.Net.Sockets.SocketException)
        {
            return false;
        }
    }

    public static Result Cli(params string[] args) =>
        Run("dotnet", [Path.Combine(Root, "src/Client/bin", Configuration, "net10.0/backprop.dll"), .. args]);

    /// <summary>The CLI with extra environment variables (e.g. BACKPROP_TLS_*).</summary>
    public static Result CliWithEnv(Dictionary<string, string> env, params string[] args) =>
        Run("dotnet", [Path.Combine(Root, "src/Client/bin", Configuration, "net10.0/backprop.dll"), .. args], env);

    /// <summary>The silo host of this test run, run directly (not through cluster.sh).</summary>
    public static Result SiloHost(params string[] args) =>
        Run("dotnet", [Path.Combine(Root, "src/Silo/bin", Configuration, "net10.0/Backprop.Silo.dll"), .. args]);

    /// <summary>cluster.sh with its state in <paramref name="state"/> and this run's silo build.</summary>
    public static Result Script(string state, params string[] args)
    {
        var env = new Dictionary<string, string>
        {
            ["BACKPROP_STATE"] = state,
            ["BACKPROP_SILO_DLL"] = Path.Combine(Root, "src/Silo/bin", Configuration, "net10.0/Backprop.Silo.dll"),
        };
        return Run("bash", [Path.Combine(Root, "deploy/local/cluster.sh"), .. args], env);
    }

    public static Result Run(string program, string[] args, Dictionary<string, string>? env = null)
    {
        var psi = new ProcessStartInfo(program) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        foreach (var (k, v) in env ?? []) psi.Environment[k] = v;
        using var process = Process.Start(psi)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(TimeSpan.FromSeconds(55)))
        {
            process.Kill(entireProcessTree: true);
            throw new TimeoutException($"{program} {string.Join(' ', args)} did not finish: {stdout.Result}{stderr.Result}");
        }
        return new Result(process.ExitCode, stdout.Result + stderr.Result, stderr.Result);
    }

    private static string FindRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "Backprop.Distributed.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("repository root not found");
    }
}
