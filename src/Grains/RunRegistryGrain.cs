using Backprop.Grains.Hosting;
using Orleans.Storage;
using Backprop.Grains.Messages;

namespace Backprop.Grains;

[GenerateSerializer]
public sealed class RunList
{
    [Id(0)] public Dictionary<string, RunSummary> Runs { get; set; } = [];
}

/// <summary>The cluster's runs, newest summary of each. Stored, so a whole-cluster restart finds them again.</summary>
public sealed class RunRegistryGrain(
    [PersistentState("registry", SiloSetup.StorageName)] IPersistentState<RunList> list, WorkerSilos workerSilos) : Grain, IRunRegistryGrain
{
    public const string Key = "all";
    /// <summary>Keeps the stored list (one grain state) bounded; the oldest finished runs are dropped first.</summary>
    private const int MaxRuns = 10_000;

    public async Task Update(RunSummary summary)
    {
        if (summary is null) throw new ArgumentException("no run summary");
        Backprop.Core.RunIds.Validate(summary.RunId);
        for (int attempt = 1; ; attempt++)
        {
            var runs = new Dictionary<string, RunSummary>(list.State.Runs) { [summary.RunId] = summary };
            if (runs.Count > MaxRuns)
                foreach (var old in runs.Values.Where(r => r.State != RunState.Running).OrderBy(r => r.Updated).Take(runs.Count - MaxRuns).ToArray())
                    runs.Remove(old.RunId);
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
