using System.Diagnostics;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Microsoft.Extensions.DependencyInjection;
using Orleans.Storage;

namespace Backprop.Tests.Cluster;

/// <summary>
/// The run list holds only runs with a stored record, forgets finished ones by age, stays under its size limit, and
/// loses running entries whose run is gone. Its own cluster: the tests write the list's storage behind its back.
/// </summary>
[Collection("cluster")]
public sealed class RunRegistryTests
{
    private static RunSummary Summary(string runId, RunState state, DateTime updated) => new(runId, state, 0, 1, null, updated);

    [Fact]
    public async Task Only_stored_runs_are_listed_finished_ones_leave_by_age_and_running_ghosts_are_dropped()
    {
        await using var fixture = await Start();
        var client = fixture.Cluster.Client;
        var registry = client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key);
        var now = DateTime.UtcNow;

        Assert.Contains("no run 'made-up' is stored", (await Assert.ThrowsAsync<ArgumentException>(() => registry.Update(Summary("made-up", RunState.Running, now)))).Message);
        Assert.Contains("not a known state", (await Assert.ThrowsAsync<ArgumentException>(() => registry.Update(Summary("made-up", (RunState)42, now)))).Message);
        Assert.Contains("is grain 'all'", (await Assert.ThrowsAsync<ArgumentException>(() =>
            client.GetGrain<IRunRegistryGrain>("another").Update(Summary("made-up", RunState.Running, now)))).Message);
        Assert.DoesNotContain(await registry.List(), r => r.RunId == "made-up");

        // What a store holds after a while: finished runs older than the limit, a recent one, and a running entry
        // whose run record is gone (a cleared store, or listed before runs were checked).
        var old = now - Retention.DefaultAge - TimeSpan.FromDays(1);
        await Plant(fixture,
        [
            Summary("old-done", RunState.Completed, old), Summary("old-failed", RunState.Failed, old),
            Summary("recent-done", RunState.Completed, now - TimeSpan.FromDays(1)), Summary("ghost", RunState.Running, old),
        ]);

        var spec = Presets.PyTorchMlp with { Epochs = 1, Workers = 1, Seed = 41 };
        await RunToEnd(client, "listed", spec);
        // The run's own updates evicted the old finished entries.
        var listed = (await registry.List()).ToDictionary(r => r.RunId);
        Assert.Equal(RunState.Completed, listed["listed"].State);
        Assert.Contains("recent-done", listed.Keys);
        Assert.DoesNotContain("old-done", listed.Keys);
        Assert.DoesNotContain("old-failed", listed.Keys);
        // A state other than running must be the record's.
        Assert.Contains("is stored as Completed, not Failed", (await Assert.ThrowsAsync<ArgumentException>(() =>
            registry.Update(Summary("listed", RunState.Failed, now)))).Message);

        // A silo's death makes every watchdog call the runs listed as running: the ghost answers "not started" and is dropped.
        await fixture.Cluster.KillSiloAsync(fixture.Cluster.Silos[2]);
        var clock = Stopwatch.StartNew();
        while ((await registry.List()).Any(r => r.RunId == "ghost") && clock.Elapsed < TimeSpan.FromSeconds(60)) await Task.Delay(20);
        var after = (await registry.List()).Select(r => r.RunId).ToArray();
        Assert.DoesNotContain("ghost", after);
        Assert.Contains("listed", after);
    }

    [Fact]
    public async Task The_list_stays_within_its_limit_dropping_the_oldest_finished_runs_and_refusing_a_run_when_all_are_running()
    {
        await using var fixture = await Start();
        var client = fixture.Cluster.Client;
        var registry = client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key);
        var now = DateTime.UtcNow;
        await RunToEnd(client, "newest", Presets.PyTorchMlp with { Epochs = 1, Workers = 1, Seed = 42 });

        var finished = Enumerable.Range(0, RunRegistryGrain.MaxRuns)
            .Select(i => Summary($"finished-{i}", RunState.Completed, now - TimeSpan.FromMinutes(RunRegistryGrain.MaxRuns - i))).ToArray();
        await Plant(fixture, finished, replace: true);
        await registry.Update(Summary("newest", RunState.Completed, now));
        var listed = (await registry.List()).Select(r => r.RunId).ToHashSet();
        Assert.Equal(RunRegistryGrain.MaxRuns, listed.Count);
        Assert.Contains("newest", listed);
        Assert.DoesNotContain("finished-0", listed);
        Assert.Contains("finished-1", listed);

        // Running entries are never evicted: a full list of them refuses a run it does not hold yet.
        var running = Enumerable.Range(0, RunRegistryGrain.MaxRuns).Select(i => Summary($"running-{i}", RunState.Running, now)).ToArray();
        await Plant(fixture, running, replace: true);
        try
        {
            Assert.Contains("the run list is full", (await Assert.ThrowsAsync<InvalidOperationException>(() =>
                registry.Update(Summary("newest", RunState.Running, now)))).Message);
            Assert.DoesNotContain(await registry.List(), r => r.RunId == "newest");
        }
        finally
        {
            // Not left for the watchdogs, which would call each of them.
            await Plant(fixture, [], replace: true);
        }
    }

    [Fact]
    public async Task Finished_runs_beyond_the_retention_are_deleted_with_their_shards_and_a_completed_run_keeps_only_its_final_version()
    {
        await using var fixture = await Start(new Retention(Runs: 2, MinimumAge: TimeSpan.Zero));
        var client = fixture.Cluster.Client;
        var registry = client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key);
        var spec = Presets.PyTorchMlp with { Epochs = 2, Workers = 2, Seed = 43, ServerShards = 2, CheckpointEvery = 3 };

        var first = await RunToEnd(client, "kept-1", spec);
        long final = first.Epochs[^1].Steps;
        // One slot left per shard, holding the last version; the other (an earlier checkpoint) is gone. The run ends
        // (as stored) before its coordinator retires the shards.
        async Task<long[][]> Slots()
        {
            var slots = new long[spec.ServerShards][];
            for (int j = 0; j < spec.ServerShards; j++)
                slots[j] = (await Task.WhenAll(new[] { "checkpoint-a", "checkpoint-b" }.Select(slot => Stored<ShardCheckpoint>(fixture, $"kept-1/{j}", slot))))
                    .Where(s => s.RecordExists).Select(s => s.State!.Step).ToArray();
            return slots;
        }
        var clock = Stopwatch.StartNew();
        while ((await Slots()).Any(s => s.Length > 1) && clock.Elapsed < TimeSpan.FromSeconds(60)) await Task.Delay(20);
        Assert.All(await Slots(), s => Assert.Equal([final], s));
        Assert.Equal(first.Epochs[^1].ParameterSha256, await ModelHash(client, "kept-1"));
        // A retire from anyone does only what the coordinator's did: the final version is the record's.
        await client.GetGrain<IParameterShardGrain>("kept-1/0").Retire();
        Assert.All(await Slots(), s => Assert.Equal([final], s));

        // Runs the retention has not evicted are not deleted on request, nor their shards.
        Assert.Contains("not being deleted", (await Assert.ThrowsAsync<InvalidOperationException>(() => client.GetGrain<IRunGrain>("kept-1").Forget())).Message);
        Assert.Contains("not being deleted", (await Assert.ThrowsAsync<InvalidOperationException>(() => client.GetGrain<IParameterShardGrain>("kept-1/0").Forget())).Message);

        var second = await RunToEnd(client, "kept-2", spec with { Seed = 44 });
        Assert.True((await Stored<RunRecord>(fixture, "kept-1", "run")).RecordExists, "2 finished runs are within the retention");
        var third = await RunToEnd(client, "kept-3", spec with { Seed = 45 });

        // The third finished run evicted the first, which is then deleted: its record and every shard's state.
        async Task<string[]> Left()
        {
            var left = new List<string>();
            if ((await Stored<RunRecord>(fixture, "kept-1", "run")).RecordExists) left.Add("the run's record");
            for (int j = 0; j < spec.ServerShards; j++)
            {
                if ((await Stored<ShardFence>(fixture, $"kept-1/{j}", "fence")).RecordExists) left.Add($"shard {j}'s fence");
                foreach (string slot in new[] { "checkpoint-a", "checkpoint-b" })
                    if ((await Stored<ShardCheckpoint>(fixture, $"kept-1/{j}", slot)).RecordExists) left.Add($"shard {j}'s {slot}");
            }
            return [.. left];
        }
        clock.Restart();
        while (((await Left()).Length > 0 || await registry.IsBeingDeleted("kept-1")) && clock.Elapsed < TimeSpan.FromSeconds(60)) await Task.Delay(20);
        Assert.Empty(await Left());
        Assert.False(await registry.IsBeingDeleted("kept-1"), "the deletion is done but still queued");
        Assert.Equal(["kept-2", "kept-3"], (await registry.List()).Select(r => r.RunId).Order());
        var gone = await client.GetGrain<IRunGrain>("kept-1").GetStatus();
        Assert.Equal(RunState.NotStarted, gone.State);
        Assert.Null(gone.Spec);
        // The kept runs' models are whole.
        Assert.Equal(second.Epochs[^1].ParameterSha256, await ModelHash(client, "kept-2"));
        Assert.Equal(third.Epochs[^1].ParameterSha256, await ModelHash(client, "kept-3"));
    }

    private static async Task<GrainState<T>> Stored<T>(ClusterFixture fixture, string key, string stateName)
    {
        var storage = fixture.Cluster.Silos[0].ServiceProvider.GetRequiredKeyedService<IGrainStorage>(SiloSetup.StorageName);
        var client = fixture.Cluster.Client;
        var id = stateName != "run" ? client.GetGrain<IParameterShardGrain>(key).GetGrainId() : client.GetGrain<IRunGrain>(key).GetGrainId();
        var state = new GrainState<T>();
        await storage.ReadStateAsync(stateName, id, state);
        return state;
    }

    private static async Task<string> ModelHash(IClusterClient client, string runId) =>
        Backprop.Core.ParameterHash.Sha256((await client.GetGrain<IRunGrain>(runId).GetModel()).Parameters.Span);

    private static async Task<ClusterFixture> Start(Retention? retention = null)
    {
        var fixture = new ClusterFixture(240, 100, retention: retention);
        await fixture.InitializeAsync();
        return fixture;
    }

    private static async Task<RunStatus> RunToEnd(IClusterClient client, string runId, RunSpec spec)
    {
        var run = client.GetGrain<IRunGrain>(runId);
        var status = await run.Start(spec);
        var clock = Stopwatch.StartNew();
        while (!status.IsFinished && clock.Elapsed < TimeSpan.FromSeconds(60))
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.True(status.State == RunState.Completed, $"{status.State}: {status.Error}");
        return status;
    }

    /// <summary>Writes entries into the stored list (replacing it or added to it), then has the registry read it afresh.</summary>
    private static async Task Plant(ClusterFixture fixture, IReadOnlyCollection<RunSummary> entries, bool replace = false)
    {
        var storage = fixture.Cluster.Silos[0].ServiceProvider.GetRequiredKeyedService<IGrainStorage>(SiloSetup.StorageName);
        var id = fixture.Cluster.Client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key).GetGrainId();
        while (true)
        {
            var state = new GrainState<RunList>();
            await storage.ReadStateAsync("registry", id, state);
            var runs = replace ? [] : state.State!.Runs;
            foreach (var entry in entries) runs[entry.RunId] = entry;
            state.State = new RunList { Runs = runs };
            try
            {
                await storage.WriteStateAsync("registry", id, state);
                break;
            }
            catch (InconsistentStateException)
            {
                // The registry wrote in between: read again.
            }
        }
        // The registry's activation holds the list it read: a fresh one reads the planted list.
        await fixture.Cluster.Client.GetGrain<IManagementGrain>(0).ForceActivationCollection(TimeSpan.Zero);
    }
}
