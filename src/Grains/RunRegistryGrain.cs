using Backprop.Grains.Hosting;
using Orleans.Storage;
using Backprop.Grains.Messages;

namespace Backprop.Grains;

[GenerateSerializer]
public sealed class RunList
{
    [Id(0)] public Dictionary<string, RunSummary> Runs { get; set; } = [];
}

/// <summary>
/// The cluster's runs, newest summary of each. Stored, so a whole-cluster restart finds them again. Only runs with a
/// stored record get in (every silo's watchdog calls each running run in the list every sweep, so made-up ids would cost
/// the whole cluster), finished runs leave after <see cref="FinishedKept"/>, and the list never holds more than
/// <see cref="MaxRuns"/>.
/// </summary>
public sealed class RunRegistryGrain(
    [PersistentState("registry", SiloSetup.StorageName)] IPersistentState<RunList> list, WorkerSilos workerSilos) : Grain, IRunRegistryGrain
{
    public const string Key = "all";
    /// <summary>Keeps the stored list (one grain state, written whole at every update) bounded; the oldest finished runs are dropped first.</summary>
    public const int MaxRuns = 10_000;
    /// <summary>How long a finished run stays listed after its last update (`runs` shows what finished lately; its record stays in storage).</summary>
    public static readonly TimeSpan FinishedKept = TimeSpan.FromDays(30);

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
        await Write(runs =>
        {
            bool added = !runs.ContainsKey(summary.RunId);
            runs[summary.RunId] = summary with { Updated = now };
            foreach (var old in runs.Values.Where(r => r.State != RunState.Running && now - r.Updated > FinishedKept).ToArray())
                runs.Remove(old.RunId);
            if (runs.Count > MaxRuns)
                foreach (var old in runs.Values.Where(r => r.State != RunState.Running).OrderBy(r => r.Updated).Take(runs.Count - MaxRuns).ToArray())
                    runs.Remove(old.RunId);
            if (added && runs.Count > MaxRuns)
                throw new InvalidOperationException($"the run list is full: {MaxRuns} runs are running");
        });
    }

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
