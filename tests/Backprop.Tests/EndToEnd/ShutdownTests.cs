using Backprop.Core.Data;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// A silo process stopped with SIGTERM, as Kubernetes and compose stop it: its shutdown work (here the test-only
/// BACKPROP_TEST_SHUTDOWN_WORK, standing for a server silo's checkpoints) gets the time of --shutdown-timeout, not
/// System.CommandLine's 2 s; the timeout bounds it; a silo stopped before it joined exits cleanly too.
/// </summary>
[Collection("cluster")]
public sealed class ShutdownTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("shutdown-").FullName;
    private string DataDir => Path.Combine(_work, "data");

    public ShutdownTests() =>
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), SyntheticDigits.Create(trainCount: 100, testCount: 20, seed: 4));

    public void Dispose() => Directory.Delete(_work, recursive: true);

    private string[] SiloArgs(params string[] extra)
    {
        var taken = new HashSet<int>();
        return ["--silo-port", Processes.FreePorts(1, taken).ToString(), "--gateway-port", Processes.FreePorts(1, taken).ToString(),
            "--cluster-id", "shutdown-" + Guid.NewGuid().ToString("N")[..8], "--data-dir", DataDir, .. extra];
    }

    [Fact]
    public void A_silo_given_SIGTERM_completes_shutdown_work_longer_than_2_s_and_exits_0()
    {
        // 6 s of work: three times System.CommandLine's default ProcessTerminationTimeout, well inside the default --shutdown-timeout of 30 s.
        using var silo = LoggedProcess.Silo(SiloArgs(), new() { ["BACKPROP_TEST_SHUTDOWN_WORK"] = "6" });
        silo.WaitForLine(l => l.Contains(" up: role all"), TimeSpan.FromSeconds(90));

        silo.Terminate();
        var stopped = silo.Finish(TimeSpan.FromSeconds(90));

        Assert.True(stopped.Code == 0, stopped.Output);
        Assert.Contains("test shutdown work: completed", stopped.Output);
        Assert.DoesNotContain("cut short", stopped.Output);
        // The silo left the cluster after the work, and the process ended after that.
        Assert.True(stopped.Output.IndexOf("test shutdown work: completed", StringComparison.Ordinal) < stopped.Output.IndexOf(" stopped", StringComparison.Ordinal), stopped.Output);
    }

    [Fact]
    public void The_shutdown_timeout_bounds_the_shutdown_work_and_the_silo_still_exits_0()
    {
        using var silo = LoggedProcess.Silo(SiloArgs("--shutdown-timeout", "3"), new() { ["BACKPROP_TEST_SHUTDOWN_WORK"] = "3600" });
        silo.WaitForLine(l => l.Contains(" up: role all"), TimeSpan.FromSeconds(90));

        silo.Terminate();
        var stopped = silo.Finish(TimeSpan.FromSeconds(90));

        Assert.True(stopped.Code == 0, stopped.Output);
        Assert.Contains("test shutdown work: cut short by the shutdown timeout", stopped.Output);
        Assert.Contains(" stopped", stopped.Output);
    }

    [Fact]
    public async Task A_silo_given_SIGTERM_while_it_joins_stops_cleanly()
    {
        int http = Processes.FreePorts(1, []);
        // Localhost clustering around a primary that is not there (port 1): the silo keeps trying to join.
        using var silo = LoggedProcess.Silo(SiloArgs("--primary", "127.0.0.1:1", "--http-port", http.ToString()));
        await HealthTests.PollReady("127.0.0.1", http, r => r.Body.Contains("joining"));

        silo.Terminate();
        var stopped = silo.Finish(TimeSpan.FromSeconds(90));

        Assert.True(stopped.Code == 0, stopped.Output);
        Assert.Contains("stopped before it joined the cluster", stopped.Output);
        Assert.DoesNotContain("error:", stopped.Output);
    }

    [Fact]
    public void A_shutdown_timeout_out_of_range_is_a_one_line_error()
    {
        var bad = Processes.SiloHost(SiloArgs("--shutdown-timeout", "0"));
        Assert.Equal(2, bad.Code);
        Assert.Equal("error: --shutdown-timeout must be in 1..3600 seconds", Assert.Single(bad.Output.Trim().Split('\n')));
    }
}
