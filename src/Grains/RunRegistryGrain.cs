using Backprop.Grains.Hosting;
using Orleans.Storage;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains;

[GenerateSerializer]
public sealed class RunList
{
    [Id(0)] public Dictionary<string, RunSummary> Runs { get; set; } = [];
    /// <summary>Runs the retention policy evicted whose deletion has not been confirmed yet: retried until it is.</summary>
    [Id(1)] public List<string> Deleting { get; set; } = [];

    public RunList Copy() => new() { Runs = new(Runs), Deleting = [.. Deleting] };
}

/// <summary>
/// How long finished runs (completed, failed, cancelled, diverged) are kept, record, checkpoints and all: at most
/// <see cref="Runs"/> of them, none older than <see cref="Age"/> since its last update. A run finished less than
/// <see cref="MinAge"/> ago is not evicted for the count (a client may still be fetching its model). Evicted runs are deleted.
/// </summary>
public sealed record Retention(int Runs = Retention.DefaultRuns, TimeSpan? MaxAge = null, TimeSpan? MinimumAge = null)
{
    public const int DefaultRuns = 10_000;
    public static readonly TimeSpan DefaultAge = TimeSpan.FromDays(30);
    public static readonly TimeSpan DefaultMinAge = TimeSpan.FromMinutes(10);
    /// <summary>The embedded silo of the CLI: the user's own runs, kept (up to the list's limit).</summary>
    public static readonly Retention Embedded = new(RunRegistryGrain.MaxRuns, TimeSpan.FromDays(36_500));

    public TimeSpan Age => MaxAge ?? DefaultAge;
    public TimeSpan MinAge => MinimumAge ?? DefaultMinAge;

    public void Validate()
    {
        if (Runs < 1 || Runs > RunRegistryGrain.MaxRuns) throw new ArgumentException($"keep-finished-runs: {Runs} is outside 1..{RunRegistryGrain.MaxRuns}");
        if (!(Age > TimeSpan.Zero)) throw new ArgumentException($"keep-finished-days: {Age.TotalDays} is not positive");
        if (MinAge < TimeSpan.Zero || MinAge > Age) throw new ArgumentException($"keep-finished-min-age: {MinAge.TotalSeconds} s is outside 0..keep-finished-days");
    }
}

/// <summary>
/// The cluster's runs, newest summary of each. Stored, so a whole-cluster restart finds them again. Only runs with a
/// stored record get in (every silo's watchdog calls each running run in the list every sweep, so made-up ids would cost
/// the whole cluster). Finished runs are evicted by the <see cref="Retention"/> policy into a stored deletion queue, and
/// deleted (<see cref="IRunGrain.Forget"/>, which only a queued run accepts) outside the call that evicted them, retried
/// at every later update until confirmed: a cluster that trains around the clock keeps a bounded store. The list never
/// holds more than <see cref="MaxRuns"/>.
/// </summary>
public sealed class RunRegistryGrain(
    [PersistentState("registry", SiloSetup.StorageName)] IPersistentState<RunList> list, WorkerSilos workerSilos, Retention retention,
    ILogger<RunRegistryGrain> logger) : Grain, IRunRegistryGrain
{
    public const string Key = "all";
    /// <summary>Keeps the stored list (one grain state, written whole at every update) bounded.</summary>
    public const int MaxRuns = 10_000;

    // One write at a time: the deletions run beside the calls and store their confirmations too.
    private readonly SemaphoreSlim _writes = new(1, 1);
    // The list as last stored: what the interleaving IsBeingDeleted answers from (never a change still being written).
    private RunList? _stored;
    private Task _deleting = Task.CompletedTask;

    private RunList Stored => _stored ??= list.State;

    public async Task Update(RunSummary summary)
    {
        if (this.GetPrimaryKeyString() != Key) throw new ArgumentException($"the run list is grain '{Key}', not '{this.GetPrimaryKeyString()}'");
        if (summary is null) throw new ArgumentException("no run summary");
        Backprop.Core.RunIds.Validate(summary.RunId);
        if (!Enum.IsDefined(summary.State)) throw new ArgumentException($"run state {(int)summary.State} is not a known state");
        var run = await StoredRuns.Read(ServiceProvider, GrainFactory, summary.RunId);
        // An evicted run is not brought back (resumed, or started again under its id) until its deletion is done; but
        // one whose record says running was resumed before an older "finished" update evicted it: it is listed again.
        bool revived = Stored.Deleting.Contains(summary.RunId) && run?.State == RunState.Running;
        if (Stored.Deleting.Contains(summary.RunId) && !revived)
            throw new ArgumentException($"run '{summary.RunId}' is being deleted (its retention ran out); try again once it is gone");
        if (run is null)
        {
            // A listed run whose record is gone (a cleared store) is dropped: the watchdog finds it not running and says so here.
            if (Stored.Runs.ContainsKey(summary.RunId)) await Write(l => l.Runs.Remove(summary.RunId));
            throw new ArgumentException($"no run '{summary.RunId}' is stored");
        }
        // Running is said before the record says it (a start or resume registers first); any other state is the record's.
        if (summary.State != RunState.Running && summary.State != run.State)
            throw new ArgumentException($"run '{summary.RunId}' is stored as {run.State}, not {summary.State}");
        // Stamped here, not by the caller: eviction by age must not depend on a caller's clock.
        var now = DateTime.UtcNow;
        await Write(l =>
        {
            // Checked again here: a write that met another writer's list applies this to that list.
            if (l.Deleting.Contains(summary.RunId) && !revived)
                throw new ArgumentException($"run '{summary.RunId}' is being deleted (its retention ran out); try again once it is gone");
            l.Deleting.Remove(summary.RunId);
            var runs = l.Runs;
            bool added = !runs.ContainsKey(summary.RunId);
            runs[summary.RunId] = summary with { Updated = now };
            // The run being updated stays: it is the newest, and its coordinator may be the caller.
            var finished = runs.Values.Where(r => r.State != RunState.Running && r.RunId != summary.RunId).OrderBy(r => r.Updated).ToList();
            int over = Math.Max(finished.Count + (summary.State == RunState.Running ? 0 : 1) - retention.Runs, runs.Count - MaxRuns);
            foreach (var old in finished.Where((r, i) => (i < over && now - r.Updated >= retention.MinAge) || now - r.Updated > retention.Age).ToArray())
            {
                // A full queue (MaxRuns deletions failing at once) leaves the run listed rather than unlisted and undeleted.
                if (l.Deleting.Count >= MaxRuns) break;
                runs.Remove(old.RunId);
                if (!l.Deleting.Contains(old.RunId)) l.Deleting.Add(old.RunId);
            }
            if (added && runs.Count > MaxRuns)
                throw new InvalidOperationException($"the run list is full: {MaxRuns} runs, running or finished less than {retention.MinAge.TotalSeconds:F0} s ago");
        });
        DeleteQueued();
    }

    public override Task OnActivateAsync(CancellationToken cancellationToken)
    {
        // This silo holds the list now: it reports the runs by state (from the stored list, before any change).
        BackpropMetrics.RunList(Stored.Runs.Values);
        DeleteQueued();
        return Task.CompletedTask;
    }

    // The deletions write the list too: the next activation must not meet a write of this one still in flight.
    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        // The list may be activated elsewhere next: only its holder reports it, so a sum over silos stays the cluster's.
        BackpropMetrics.RunListLeft();
        return _deleting.WaitAsync(cancellationToken).ContinueWith(_ => { }, TaskScheduler.Default);
    }

    /// <summary>
    /// Deletes the queued runs one by one, beside this grain's calls (a run's <see cref="IRunGrain.Forget"/> asks this
    /// grain whether it is queued, and its coordinator may be waiting for this grain); a run whose deletion fails stays
    /// queued for the next update.
    /// </summary>
    private void DeleteQueued()
    {
        if (!_deleting.IsCompleted || Stored.Deleting.Count == 0) return;
        _deleting = DeleteAll();
    }

    private async Task DeleteAll()
    {
        var done = new List<string>();
        foreach (string runId in Stored.Deleting.ToArray())
        {
            try
            {
                await GrainFactory.GetGrain<IRunGrain>(runId).Forget();
                done.Add(runId);
                logger.LogInformation("Run {Run} deleted: its retention ran out", runId);
            }
            catch (Exception e)
            {
                logger.LogWarning("Run {Run} is still to be deleted (retried at the next update): {Error}", runId, e.Message);
            }
            // Confirmed in batches: the list is written whole, and thousands of runs may be queued at once.
            if (done.Count == 100) await Confirm();
        }
        await Confirm();

        async Task Confirm()
        {
            if (done.Count == 0) return;
            string[] confirmed = [.. done];
            done.Clear();
            try
            {
                await Write(l => l.Deleting.RemoveAll(confirmed.Contains));
            }
            catch (Exception e)
            {
                // Deleted but still queued: the next pass finds them gone (Forget of a deleted run does nothing).
                logger.LogWarning("Could not store that {Count} runs were deleted: {Error}", confirmed.Length, e.Message);
            }
        }
    }

    public Task<bool> IsBeingDeleted(string runId) => Task.FromResult(runId is not null && Stored.Deleting.Contains(runId));

    /// <summary>Changes a copy of the list and stores it; the list in memory changes only once the write succeeded.</summary>
    private async Task Write(Action<RunList> change)
    {
        await _writes.WaitAsync();
        try
        {
            for (int attempt = 1; ; attempt++)
            {
                var next = list.State.Copy();
                change(next);
                var before = list.State;
                list.State = next;
                try
                {
                    await list.WriteStateAsync();
                    _stored = next;
                    BackpropMetrics.RunList(next.Runs.Values);
                    return;
                }
                catch (InconsistentStateException) when (attempt < 5)
                {
                    // Another writer (a second CLI process on the same embedded store) got there first: merge into its list.
                    list.State = before;
                    await list.ReadStateAsync();
                    _stored = list.State;
                }
                catch
                {
                    list.State = before;
                    throw;
                }
            }
        }
        finally
        {
            _writes.Release();
        }
    }

    public Task<RunSummary[]> List() => Task.FromResult(Stored.Runs.Values.OrderBy(r => r.Updated).ToArray());

    public Task<string[]> Running() =>
        Task.FromResult(Stored.Runs.Values.Where(r => r.State == RunState.Running).Select(r => r.RunId).ToArray());

    public Task<string[]> WorkerSilos() => Task.FromResult(workerSilos.Active());
}
