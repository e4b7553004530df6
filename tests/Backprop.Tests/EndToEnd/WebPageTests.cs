using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Text.Json;
using System.Text.RegularExpressions;
using Backprop.Core.Data;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// `train --http-port` as a person watching a run meets it: /metrics in Prometheus text with every family of the Backprop
/// meter and counters that move while the run trains, the page's JSON (404 for an unknown run), the page itself loaded in
/// headless Chromium (the run, a curve of at least two epochs, the workers table naming the silo; a screenshot under
/// the test's output folder), and the Orleans Dashboard.
/// </summary>
[Collection("cluster")]
public sealed partial class WebPageTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("web-").FullName;
    private string DataDir => Path.Combine(_work, "data");
    private static readonly HttpClient Http = new() { Timeout = TimeSpan.FromSeconds(20) };

    /// <summary>The screenshot's folder, beside the test assembly (CI keeps it as an artifact).</summary>
    public static readonly string OutputDir = Path.Combine(AppContext.BaseDirectory, "web-page");

    private static readonly string[] Families =
    [
        "backprop_steps_total", "backprop_samples_total", "backprop_wire_bytes_total", "backprop_recoveries_total", "backprop_redos_total",
        "backprop_resumes_total", "backprop_worker_failures_total", "backprop_lane_calls_total", "backprop_lane_fallbacks_total", "backprop_push_early_total", "backprop_step_duration_seconds", "backprop_step_compute_duration_seconds",
        "backprop_step_transfer_duration_seconds", "backprop_step_reduce_and_step_duration_seconds", "backprop_step_server_call_duration_seconds",
        "backprop_step_barrier_wait_duration_seconds", "backprop_worker_compute_duration_seconds", "backprop_worker_compute_median_seconds",
        "backprop_checkpoint_duration_seconds",
        "backprop_epoch_test_accuracy", "backprop_epoch_test_loss", "backprop_runs", "backprop_silos",
    ];

    public WebPageTests() => IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), SyntheticDigits.Create(trainCount: 640, testCount: 200, seed: 5));

    public void Dispose() => Directory.Delete(_work, recursive: true);

    [Fact]
    public async Task A_running_training_is_seen_on_metrics_the_json_the_page_in_chromium_and_the_dashboard()
    {
        int port = Processes.FreePorts(1, []);
        string url = $"http://127.0.0.1:{port}";
        var train = CliProcess.Start("train", "--epochs", "1000", "--workers", "2", "--run-id", "watched", "--data-dir", DataDir, "--http-port", $"{port}");
        try
        {
            train.WaitForLine(line => line.TrimStart().StartsWith("2 "), TimeSpan.FromSeconds(120));

            // Metrics: every family; the counters move while the run trains (scraped again after another epoch).
            string text = await Text(url + "/metrics");
            var declared = text.Split('\n').Where(l => l.StartsWith("# TYPE ", StringComparison.Ordinal)).Select(l => l.Split(' ')[2]).ToHashSet();
            foreach (var family in Families) Assert.True(declared.Contains(family), $"{family} missing from /metrics");
            Assert.Contains(declared, f => f.StartsWith("dotnet_", StringComparison.Ordinal) || f.StartsWith("process_runtime_dotnet_", StringComparison.Ordinal));
            var first = Prometheus(text);
            Assert.Equal(1, first[Key(first, "backprop_runs", "state=\"running\"")]);
            Assert.Equal(1, first[Key(first, "backprop_silos", "role=\"all\"")]);
            Assert.InRange(first[Key(first, "backprop_epoch_test_accuracy", "run=\"watched\"")], 0.0, 1.0);
            Assert.True(first[Key(first, "backprop_worker_compute_duration_seconds_count", "worker=\"1\"")] > 0);
            // The CLI's lines lag the run (its epochs here take milliseconds): scraped until every counter moved, or 120 s.
            string[] counters = ["backprop_steps_total", "backprop_samples_total", "backprop_step_duration_seconds_count", "backprop_checkpoint_duration_seconds_count"];
            var second = first;
            var clock = System.Diagnostics.Stopwatch.StartNew();
            while (counters.Any(c => second[Key(second, c)] <= first[Key(first, c)]) && clock.Elapsed < TimeSpan.FromSeconds(120))
            {
                await Task.Delay(50);
                second = Prometheus(await Text(url + "/metrics"));
            }
            foreach (var counter in counters)
                Assert.True(second[Key(second, counter)] > first[Key(first, counter)], $"{counter} did not move: {first[Key(first, counter)]} then {second[Key(second, counter)]}");
            Assert.Equal(0, second[Key(second, "backprop_redos_total")]);

            // The page's JSON; an unknown or malformed id is a 404 with one line.
            using var runs = JsonDocument.Parse(await Text(url + "/api/runs"));
            var row = Assert.Single(runs.RootElement.GetProperty("runs").EnumerateArray());
            Assert.Equal("watched", row.GetProperty("id").GetString());
            Assert.Equal("running", row.GetProperty("state").GetString());
            using var run = JsonDocument.Parse(await Text(url + "/api/runs/watched"));
            Assert.True(run.RootElement.GetProperty("curve").GetArrayLength() >= 2);
            string silo = Assert.Single(run.RootElement.GetProperty("workerSilos").EnumerateArray()).GetString()!;
            Assert.Matches(@"^127\.0\.0\.1:\d+$", silo);
            foreach (var unknown in new[] { "nope", "bad%20id%3Cscript%3E" })
            {
                var missing = await Http.GetAsync($"{url}/api/runs/{unknown}");
                Assert.Equal(HttpStatusCode.NotFound, missing.StatusCode);
                string body = await missing.Content.ReadAsStringAsync();
                Assert.Matches(@"^unknown run id '[A-Za-z0-9._?-]*'\n$", body);
            }
            Assert.Equal(HttpStatusCode.BadRequest, (await Http.GetAsync(url + "/api/runs?limit=100000")).StatusCode);
            Assert.Equal(HttpStatusCode.MethodNotAllowed, (await Http.PostAsync(url + "/api/runs/watched", null)).StatusCode);

            // The page in a real browser: the run, its curves, the workers table with the silo.
            string dom = Chromium("--virtual-time-budget=10000", "--dump-dom", $"{url}/#watched").Output;
            Assert.Contains("run watched", dom);
            var points = PolylinePoints().Matches(dom).Select(m => int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture)).ToArray();
            Assert.NotEmpty(points);
            Assert.All(points, n => Assert.True(n >= 2, dom));
            var workers = Regex.Match(dom, "<table id=\"workers-table\">.*?</table>", RegexOptions.Singleline).Value;
            Assert.Contains($"<td>{silo}</td>", workers);

            Directory.CreateDirectory(OutputDir);
            string png = Path.Combine(OutputDir, "watching-a-run.png");
            File.Delete(png);
            Chromium("--virtual-time-budget=10000", "--window-size=1280,900", $"--screenshot={png}", $"{url}/#watched");
            byte[] image = File.ReadAllBytes(png);
            Assert.True(image.Length > 10_000, $"screenshot of {image.Length} bytes");
            Assert.Equal([0x89, (byte)'P', (byte)'N', (byte)'G'], image[..4]);

            // The Orleans Dashboard, linked from the page.
            Assert.Contains("href=\"dashboard/\"", dom);
            Assert.Contains("<script", await Text(url + "/dashboard/"));
            Assert.StartsWith("{", (await Text(url + "/dashboard/DashboardCounters")).TrimStart());
            // Not served: the dashboard's page that calls methods of any grain; unknown paths are one line.
            var grainState = await Http.GetAsync(url + "/dashboard/GrainState?grainId=x&grainType=Backprop.Grains.RunGrain");
            Assert.Equal(HttpStatusCode.NotFound, grainState.StatusCode);
            var nowhere = await Http.GetAsync(url + "/api/runs/a/b");
            Assert.Equal(HttpStatusCode.NotFound, nowhere.StatusCode);
            Assert.Equal("not found\n", await nowhere.Content.ReadAsStringAsync());
        }
        finally
        {
            train.Interrupt();
            train.Finish(TimeSpan.FromSeconds(60));
        }
    }

    [Theory]
    [InlineData("0")]
    [InlineData("70000")]
    public void A_bad_http_port_is_a_one_line_usage_error(string port)
    {
        var r = Processes.Cli("train", "--epochs", "1", "--data-dir", DataDir, "--http-port", port);
        Assert.Equal(2, r.Code);
        Assert.Equal($"error: --http-port: {port} is outside 1..65535", r.Error.Trim());
    }

    private static async Task<string> Text(string url)
    {
        var response = await Http.GetAsync(url);
        string body = await response.Content.ReadAsStringAsync();
        Assert.True(response.IsSuccessStatusCode, $"{url}: {(int)response.StatusCode} {body}");
        return body;
    }

    /// <summary>Prometheus text: sample name with its labels (as written) to value; comments skipped.</summary>
    private static Dictionary<string, double> Prometheus(string text)
    {
        var samples = new Dictionary<string, double>(StringComparer.Ordinal);
        foreach (var line in text.Split('\n'))
        {
            if (line.Length == 0 || line[0] == '#') continue;
            // "name{labels} value" or "name value", a timestamp after the value at times.
            int end = line.Contains('}') ? line.LastIndexOf('}') + 1 : line.IndexOf(' ');
            string name = line[..end];
            string value = line[(end + 1)..].Split(' ')[0];
            samples[name] = value switch { "+Inf" => double.PositiveInfinity, "-Inf" => double.NegativeInfinity, _ => double.Parse(value, CultureInfo.InvariantCulture) };
        }
        return samples;
    }

    /// <summary>The one sample of <paramref name="name"/> whose labels hold <paramref name="label"/>.</summary>
    private static string Key(Dictionary<string, double> samples, string name, string label = "") =>
        Assert.Single(samples.Keys, k => (k == name || k.StartsWith(name + "{", StringComparison.Ordinal)) && k.Contains(label, StringComparison.Ordinal));

    private Processes.Result Chromium(params string[] args)
    {
        var r = Processes.Run("chromium", ["--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + Path.Combine(_work, "chromium"), .. args]);
        Assert.True(r.Code == 0, r.Output);
        return r;
    }

    [GeneratedRegex("<polyline [^>]*data-points=\"(\\d+)\"")]
    private static partial Regex PolylinePoints();
}
