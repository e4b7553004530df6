using System.Diagnostics;
using System.Net;
using Backprop.Core.Data;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// A real silo process answers /healthz and /readyz: ready once it has joined and loaded its data, never with damaged
/// data; live, and saying it is joining, before it has joined.
/// </summary>
[Collection("cluster")]
public sealed class HealthTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("health-").FullName;
    private readonly List<Process> _silos = [];
    private static readonly HttpClient Http = new() { Timeout = TimeSpan.FromSeconds(5) };

    public void Dispose()
    {
        foreach (var silo in _silos)
        {
            if (!silo.HasExited) silo.Kill(entireProcessTree: true);
            silo.WaitForExit();
            silo.Dispose();
        }
        Directory.Delete(_work, recursive: true);
    }

    [Fact]
    public async Task A_worker_silo_is_live_and_becomes_ready_after_joining_and_loading_its_data()
    {
        string dataDir = Path.Combine(_work, "good");
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(dataDir, "mnist"), SyntheticDigits.Create(200, 50, seed: 2));
        int http = StartSilo(dataDir, "worker");

        Assert.Equal(HttpStatusCode.OK, (await Get(http, "/healthz")).Code);
        var ready = await PollReady(http, r => r.Code == HttpStatusCode.OK);
        Assert.Equal("ready", ready.Body.Trim());
    }

    [Fact]
    public async Task A_silo_that_has_not_joined_yet_is_live_and_not_ready_because_it_is_joining()
    {
        string dataDir = Path.Combine(_work, "joining");
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(dataDir, "mnist"), SyntheticDigits.Create(200, 50, seed: 2));
        // Localhost clustering around a primary that is not there (port 1): the silo keeps trying to join.
        int http = StartSilo(dataDir, "worker", "--primary", "127.0.0.1:1");

        var joining = await PollReady(http, r => r.Body.Contains("joining"));
        Assert.Equal(HttpStatusCode.ServiceUnavailable, joining.Code);
        Assert.Equal("not ready: joining", joining.Body.Trim());
        Assert.Equal(HttpStatusCode.OK, (await Get(http, "/healthz")).Code);
    }

    [Fact]
    public async Task A_silo_whose_data_set_is_damaged_is_live_but_not_ready_and_says_why()
    {
        string dataDir = Path.Combine(_work, "bad");
        string dir = DatasetCatalog.DirectoryOf(dataDir, "mnist");
        IdxWriter.WriteDataset(dir, SyntheticDigits.Create(200, 50, seed: 2));
        File.WriteAllBytes(Path.Combine(dir, DatasetCatalog.TrainImages), [1, 2, 3]);
        int http = StartSilo(dataDir, "all");

        var final = await PollReady(http, r => r.Body.Contains("failed to load"));
        Assert.Equal(HttpStatusCode.ServiceUnavailable, final.Code);
        Assert.Contains(DatasetCatalog.TrainImages, final.Body);
        Assert.StartsWith("not ready: data set mnist failed to load", final.Body);
        Assert.Equal(HttpStatusCode.OK, (await Get(http, "/healthz")).Code);
    }

    /// <summary>Starts a silo of <paramref name="role"/> on free ports; returns its HTTP port once /healthz answers.</summary>
    [Fact]
    public async Task A_silo_without_the_folder_of_its_own_data_set_is_not_ready_and_says_why()
    {
        string missing = Path.Combine(_work, "not-on-this-silo");
        int http = StartSilo(Path.Combine(_work, "own"), "worker", "--dataset", missing);

        var final = await PollReady(http, r => r.Body.Contains("failed to load"));
        Assert.Equal(HttpStatusCode.ServiceUnavailable, final.Code);
        Assert.Equal($"not ready: data set {missing} failed to load: {missing}: no such folder (a dataset folder must be at the same path on every silo)", final.Body.Trim());
    }

    private int StartSilo(string dataDir, string role, params string[] extra)
    {
        var taken = new HashSet<int>();
        int silo = Processes.FreePorts(1, taken), gateway = Processes.FreePorts(1, taken), http = Processes.FreePorts(1, taken);
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { Path.Combine(Processes.Root, "src/Silo/bin", Processes.Configuration, "net10.0/Backprop.Silo.dll"),
            "--silo-port", silo.ToString(), "--gateway-port", gateway.ToString(), "--http-port", http.ToString(), "--role", role,
            "--data-dir", dataDir, "--cluster-id", "health-" + Guid.NewGuid().ToString("N")[..8] }.Concat(extra))
            psi.ArgumentList.Add(a);
        var process = Process.Start(psi)!;
        process.OutputDataReceived += (_, _) => { };
        process.ErrorDataReceived += (_, _) => { };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        _silos.Add(process);
        return http;
    }

    internal sealed record Reply(HttpStatusCode Code, string Body);

    private static Task<Reply> Get(int port, string path) => Get("127.0.0.1", port, path);

    internal static async Task<Reply> Get(string host, int port, string path)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            try
            {
                using var response = await Http.GetAsync($"http://{host}:{port}{path}");
                return new Reply(response.StatusCode, await response.Content.ReadAsStringAsync());
            }
            catch (HttpRequestException) when (clock.Elapsed < TimeSpan.FromSeconds(60))
            {
                await Task.Delay(50);   // not listening yet: the process is starting
            }
        }
    }

    /// <summary>Polls /readyz until <paramref name="done"/> holds (or a minute has passed); returns the last reply.</summary>
    private static Task<Reply> PollReady(int port, Func<Reply, bool> done) => PollReady("127.0.0.1", port, done);

    internal static async Task<Reply> PollReady(string host, int port, Func<Reply, bool> done)
    {
        var clock = Stopwatch.StartNew();
        var reply = await Get(host, port, "/readyz");
        while (!done(reply) && clock.Elapsed < TimeSpan.FromSeconds(60))
        {
            await Task.Delay(50);
            reply = await Get(host, port, "/readyz");
        }
        Assert.True(done(reply), $"/readyz: {(int)reply.Code} {reply.Body}");
        return reply;
    }
}
