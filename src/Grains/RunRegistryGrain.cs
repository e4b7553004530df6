using Backprop.Grains.Hosting;
using Orleans.Storage;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains;

[GenerateSerializer]
public sealed class RunList
{
    [Id(0)] public Dictionary<string, RunSummary> Runs { get; set; } = [];
}

/// <summary>
/// How long finished runs (completed, failed, cancelled, diverged) are kept, record, checkpoints and all: at most
/// <see cref="Runs"/> of them, none older than <see cref="Age"/> since its last update. Evicted runs are deleted.
/// </summary>
public sealed record Retention(int Runs = Retention.DefaultRuns, TimeSpan? MaxAge = null)
{
    public const int DefaultRuns = 10_000;
    public static readonly TimeSpan DefaultAge = TimeSpan.FromDays(30);

    public TimeSpan Age => MaxAge ?? DefaultAge;

    public void Validate()
    {
        if (Runs < 1 || Runs > RunRegistryGrain.MaxRuns) throw new ArgumentException($"keep-finished-runs: {Runs} is outside 1..{RunRegistryGrain.MaxRuns}");
        if (!(Age > TimeSpan.Zero)) throw new ArgumentException($"keep-finished-days: {Age.TotalDays} is not positive");
    }
}

/// <summary>
/// The cluster's runs, newest summary of each. Stored, so a whole-cluster restart finds them again. Only runs with a
/// stored record get in (every silo's watchdog calls each running run in the list every sweep, so made-up ids would cost
/// the whole cluster); finished runs are evicted by the <see cref="Retention"/> policy and then deleted from storage
/// (<see cref="IRunGrain.Forget"/>), so that a cluster that trains around the clock keeps a bounded store; the list
/// never holds more than <see cref="MaxRuns"/>.
/// </summary>
public sealed class RunRegistryGrain(
    [PersistentState("registry", SiloSetup.StorageName)] IPersistentState<RunList> list, WorkerSilos workerSilos, Retention retention,
    ILogger<RunRegistryGrain> logger) : Grain, IRunRegistryGrain
{
    public const string Key = "all";
    /// <summary>Keeps the stored list (one grain state, written whole at every update) bounded.</summary>
    public const int MaxRuns = 10_000;

    public async Task Update(RunSummary summary)
    {
        if (this.GetPrimaryKeyString() != Key) throw new ArgumentException($"the run list is grain '{Key}', not '{this.GetPrimaryKeyString()}'");
        if (summary is null) throw new ArgumentException("no run summary");
        Backprop.Core.RunIds.Validate(summary.RunId);
        if (!Enum.IsDefined(summary.State)) throw new ArgumentException($"run state {(int)summary.State} is not a known state");
        var run = await StoredRuns.Read(ServiceProvider, GrainFactory, summary.RunId);
        if (run is null)
        {
            // A listed run whose record is gone (a cleared store) is dropped: the watchdog finds it not running and says so here.
            if (list.State.Runs.ContainsKey(summary.RunId)) await Write(runs => runs.Remove(summary.RunId));
            throw new ArgumentException($"no run '{summary.RunId}' is stored");
        }
        // Running is said before the record says it (a start or resume registers first); any other state is the record's.
        if (summary.State != RunState.Running && summary.State != run.State)
            throw new ArgumentException($"run '{summary.RunId}' is stored as {run.State}, not {summary.State}");
        // Stamped here, not by the caller: eviction by age must not depend on a caller's clock.
        var now = DateTime.UtcNow;
        var before = list.State.Runs;
        await Write(runs =>
        {
            bool added = !runs.ContainsKey(summary.RunId);
            runs[summary.RunId] = summary with { Updated = now };
            // The run being updated stays: it is the newest, and its coordinator may be the caller.
            var finished = runs.Values.Where(r => r.State != RunState.Running && r.RunId != summary.RunId).OrderBy(r => r.Updated).ToList();
            int over = Math.Max(finished.Count + (summary.State == RunState.Running ? 0 : 1) - retention.Runs, runs.Count - MaxRuns);
            foreach (var old in finished.Where((r, i) => i < over || now - r.Updated > retention.Age).ToArray())
                runs.Remove(old.RunId);
            if (added && runs.Count > MaxRuns)
                throw new InvalidOperationException($"the run list is full: {MaxRuns} runs are running");
        });
        // Deleted outside this call's turn: a run's Forget asks whether it is still listed, and its coordinator may be
        // waiting for this grain.
        string[] evicted = [.. before.Keys.Where(id => !list.State.Runs.ContainsKey(id))];
        if (evicted.Length > 0) _ = Delete(evicted);
    }

    private async Task Delete(string[] runIds)
    {
        foreach (string runId in runIds)
        {
            try
            {
                await GrainFactory.GetGrain<IRunGrain>(runId).Forget();
            }
            catch (Exception e)
            {
                logger.LogWarning("Run {Run} left the run list but could not be deleted: {Error}", runId, e.Message);
            }
        }
    }

    public Task<bool> Lists(string runId) => Task.FromResult(runId is not null && list.State.Runs.ContainsKey(runId));

    /// <summary>Changes a copy of the list and stores it; the list in memory changes only once the write succeeded.</summary>
    private async Task Write(Action<Dictionary<string, RunSummary>> change)
    {
        for (int attempt = 1; ; attempt++)
        {
            var runs = new Dictionary<string, RunSummary>(list.State.Runs);
            change(runs);
            var before = list.State;
            list.State = new RunList { Runs = runs };
            try
            {
                await list.WriteStateAsync();
                BackpropMetrics.RunList(runs.Values);
                return;
            }
            catch (InconsistentStateException) when (attempt < 5)
            {
                // Another writer (a second CLI process on the same embedded store) got there first: merge into its list.
                await list.ReadStateAsync();
            }
            catch
            {
                list.State = before;
                throw;
            }
        }
    }

    public Task<RunSummary[]> List() => Task.FromResult(list.State.Runs.Values.OrderBy(r => r.Updated).ToArray());

    public Task<string[]> Running() =>
        Task.FromResult(list.State.Runs.Values.Where(r => r.State == RunState.Running).Select(r => r.RunId).ToArray());

    public Task<string[]> WorkerSilos() => Task.FromResult(workerSilos.Active());
}
