using Backprop.Core;
using Backprop.Grains.Messages;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;

namespace Backprop.Grains.Hosting;

/// <summary>
/// The page at / (its HTML, script and style are embedded in this assembly) and the JSON it polls: /api/runs (the run
/// list, newest first, a page at a time) and /api/runs/{id} (one run: curves, workers, shards, a page of its events).
/// Read-only: nothing here starts, cancels or changes a run.
/// </summary>
public static class RunPages
{
    public const int DefaultPage = 50, MaxPage = 500;

    private static readonly Dictionary<string, string> Assets = new(StringComparer.Ordinal)
    {
        ["/"] = "index.html",
        ["/app.js"] = "app.js",
        ["/style.css"] = "style.css",
    };

    /// <summary>The most epochs a run's curves carry: the last ones (a run may have up to 100,000).</summary>
    public const int MaxCurvePoints = 1000;

    public static void Map(WebApplication app, IGrainFactory grains, Func<bool> ready)
    {
        var list = new RunListCache(grains);
        foreach (var (path, name) in Assets)
        {
            byte[] bytes = Asset(name);
            string type = name.EndsWith(".js", StringComparison.Ordinal) ? "text/javascript" : name.EndsWith(".css", StringComparison.Ordinal) ? "text/css" : "text/html";
            app.MapGet(path, () => Results.Bytes(bytes, type + "; charset=utf-8"));
        }
        app.MapGet("/api/runs", async (HttpRequest request) =>
        {
            if (!ready()) return NotReady();
            if (!TryPage(request, out int offset, out int limit, out string? error)) return Results.Text(error + "\n", statusCode: 400);
            var runs = await list.Get();
            var page = runs.OrderByDescending(r => r.Updated).ThenBy(r => r.RunId, StringComparer.Ordinal).Skip(offset).Take(limit).ToArray();
            // Samples/s is in a run's epochs, not in the list: asked of the runs on this page that are still running.
            var rows = await Task.WhenAll(page.Select(async r => new
            {
                id = r.RunId,
                state = State(r.State),
                epochsDone = r.EpochsDone,
                epochs = r.Epochs,
                accuracy = r.LastAccuracy,
                samplesPerSecond = r.State == RunState.Running && r.EpochsDone > 0 ? await LastRate(grains, r) : null,
                updated = r.Updated,
            }));
            return Results.Json(new { total = runs.Length, offset, limit, runs = rows });
        });
        app.MapGet("/api/runs/{id}", async (string id, HttpRequest request) =>
        {
            if (!ready()) return NotReady();
            if (!TryPage(request, out int offset, out int limit, out string? error)) return Results.Text(error + "\n", statusCode: 400);
            // Only runs the list holds: an id from the address bar never activates a grain of its own.
            if (!ValidId(id) || !(await list.Get()).Any(r => r.RunId == id))
                return Results.Text($"unknown run id '{Printable(id)}'\n", statusCode: 404);
            var s = await grains.GetGrain<IRunGrain>(id).GetStatus();
            var events = s.Events.Reverse().Skip(offset).Take(limit)
                .Select(e => new { time = e.Time, kind = e.Kind, message = e.Message }).ToArray();
            return Results.Json(new
            {
                id = s.RunId,
                state = State(s.State),
                error = s.Error,
                epoch = s.Epoch,
                epochs = s.Spec?.Epochs,
                step = s.Step,
                stepInEpoch = s.StepInEpoch,
                stepsPerEpoch = s.StepsPerEpoch,
                model = s.Spec?.Model.Describe(),
                curve = s.Epochs.Skip(Math.Max(0, s.Epochs.Length - MaxCurvePoints)).Select(e => new { epoch = e.Epoch, trainLoss = e.TrainLoss, testLoss = e.TestLoss, testAccuracy = e.TestAccuracy, samplesPerSecond = e.SamplesPerSecond, seconds = e.Seconds }),
                coordinator = s.CoordinatorSilo,
                workers = s.Spec?.Workers,
                workerSilos = s.WorkerSilos,
                // Each worker's compute per step over its last steps; a straggler with the sentence status prints.
                workerStats = s.Workers.Select(w => new
                {
                    id = w.Worker, silo = w.Silo, blocks = w.Blocks, computeMedianSeconds = w.ComputeMedianSeconds,
                    computeP95Seconds = w.ComputeP95Seconds, straggler = w.Straggler, note = w.Straggler ? w.Slower(s.Workers) : null,
                }),
                shards = s.ShardSilos.Select((silo, i) => new { index = i, silo }),
                eventCount = s.Events.Length,
                eventOffset = offset,
                events,
            });
        });
    }

    private static async Task<double?> LastRate(IGrainFactory grains, RunSummary r)
    {
        var status = await grains.GetGrain<IRunGrain>(r.RunId).GetStatus(knownEpochs: r.EpochsDone - 1);
        return status.Epochs.Length > 0 ? status.Epochs[^1].SamplesPerSecond : null;
    }

    private static bool TryPage(HttpRequest request, out int offset, out int limit, out string? error)
    {
        (offset, limit, error) = (0, DefaultPage, null);
        if (request.Query.TryGetValue("offset", out var o) && (!int.TryParse(o, out offset) || offset < 0))
            error = "offset: a whole number >= 0";
        else if (request.Query.TryGetValue("limit", out var l) && (!int.TryParse(l, out limit) || limit is < 1 or > MaxPage))
            error = $"limit: a whole number in 1..{MaxPage}";
        return error is null;
    }

    private static bool ValidId(string id)
    {
        try
        {
            RunIds.Validate(id);
            return true;
        }
        catch (ArgumentException)
        {
            return false;
        }
    }

    /// <summary>An id from the address bar, safe to echo in one line of text.</summary>
    private static string Printable(string id) =>
        new(id.Take(RunIds.MaxLength).Select(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-' ? c : '?').ToArray());

    private static IResult NotReady() => Results.Text("the silo is not ready (see /readyz)\n", statusCode: 503);

    private static string State(RunState state) => state.ToString().ToLowerInvariant();

    private static byte[] Asset(string name)
    {
        using var stream = typeof(RunPages).Assembly.GetManifestResourceStream("web/" + name)
            ?? throw new InvalidOperationException($"embedded resource web/{name} is missing from the build");
        using var copy = new MemoryStream();
        stream.CopyTo(copy);
        return copy.ToArray();
    }
}

/// <summary>
/// The run list as the page reads it, asked of the registry at most once a second however many tabs poll: the list is
/// up to 10,000 runs, and the registry's calls queue behind its storage writes, which runs wait for.
/// </summary>
internal sealed class RunListCache(IGrainFactory grains)
{
    private static readonly TimeSpan MaxAge = TimeSpan.FromSeconds(1);
    private readonly object _lock = new();
    private (long At, Task<RunSummary[]> List)? _last;

    public Task<RunSummary[]> Get()
    {
        lock (_lock)
        {
            long now = System.Diagnostics.Stopwatch.GetTimestamp();
            if (_last is { } last && !last.List.IsFaulted && System.Diagnostics.Stopwatch.GetElapsedTime(last.At, now) < MaxAge) return last.List;
            var list = grains.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key).List();
            _last = (now, list);
            return list;
        }
    }
}
