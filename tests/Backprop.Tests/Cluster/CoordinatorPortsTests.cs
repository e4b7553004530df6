using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging.Abstractions;

namespace Backprop.Tests.Cluster;

/// <summary>
/// The coordinator's journal and shards against plain objects in memory, no cluster: they see storage, the run list
/// and the shards only through the ports RunGrain connects to Orleans.
/// </summary>
public sealed class CoordinatorPortsTests
{
    /// <summary>
    /// Storage as grain storage behaves for one writer: a write over a version someone else stored since this copy's
    /// last write is a conflict, decided by the caller's test of the stored record.
    /// </summary>
    private sealed class MemoryState<T>(T initial) : IStoredState<T>
    {
        private int _version, _seen;

        public T State { get; set; } = initial;
        /// <summary>What storage holds: at first the copy this coordinator read.</summary>
        public T Stored { get; private set; } = initial;
        public int Writes { get; private set; }
        public Exception? FailNext { get; set; }

        /// <summary>Another owner (or a storage that lost its copy) stored <paramref name="theirs"/>.</summary>
        public void WrittenElsewhere(T theirs) => (Stored, _version) = (theirs, _version + 1);

        public Task Write()
        {
            if (FailNext is { } failure)
            {
                FailNext = null;
                return Task.FromException(failure);
            }
            (Stored, _seen, Writes) = (State, ++_version, Writes + 1);
            return Task.CompletedTask;
        }

        public Task WriteAuthoritative(Func<T, T, bool>? superseded = null) =>
            _seen != _version && superseded is not null && superseded(Stored, State)
                ? Task.FromException(new StaleCoordinatorException("a newer coordinator has written this run's state"))
                : Write();
    }

    private sealed class MemoryRunList : IRunList
    {
        public List<RunSummary> Summaries { get; } = [];
        public bool Failing { get; set; }

        public Task Update(RunSummary summary)
        {
            if (Failing) return Task.FromException(new TimeoutException("the run list did not answer"));
            Summaries.Add(summary);
            return Task.CompletedTask;
        }
    }

    [Fact]
    public async Task A_journal_that_meets_a_newer_coordinators_record_is_fenced_keeps_its_record_and_never_writes_again()
    {
        var stored = new MemoryState<RunRecord>(new RunRecord());
        int fenced = 0;
        var journal = new RunJournal(stored, "r", new MemoryRunList(), NullLogger.Instance, () => fenced++);
        await journal.Update(r => r.Incarnation = 1, claim: true);
        var mine = journal.Record;

        stored.WrittenElsewhere(new RunRecord { Incarnation = 2, State = RunState.Running });
        await Assert.ThrowsAsync<StaleCoordinatorException>(() => journal.Update(r => r.State = RunState.Completed));

        Assert.True(journal.Fenced);
        Assert.Equal(1, fenced);
        Assert.Same(mine, journal.Record);   // the refused change is not in memory
        Assert.Equal(RunState.NotStarted, journal.Record.State);
        int writes = stored.Writes;
        await Assert.ThrowsAsync<StaleCoordinatorException>(() => journal.Update(r => r.Error = "late"));
        await Assert.ThrowsAsync<StaleCoordinatorException>(() => journal.AddEventNow("late", "after the fence"));
        Assert.Throws<StaleCoordinatorException>(journal.ThrowIfFenced);
        Assert.Equal(writes, stored.Writes);
        Assert.Equal(2, stored.Stored.Incarnation);
        Assert.Equal(RunState.Running, stored.Stored.State);
    }

    [Fact]
    public async Task A_claim_is_refused_by_an_equal_incarnation_a_plain_write_stores_over_an_older_or_equal_one_and_a_failed_write_changes_nothing()
    {
        var stored = new MemoryState<RunRecord>(new RunRecord());
        var journal = new RunJournal(stored, "r", new MemoryRunList(), NullLogger.Instance, () => { });
        await journal.Update(r => r.Incarnation = 1, claim: true);

        // Storage came back without the record (in-memory storage whose silo died): this coordinator's copy is the run's.
        stored.WrittenElsewhere(new RunRecord());
        await journal.Update(r => r.State = RunState.Running);
        Assert.Equal((1, RunState.Running), (stored.Stored.Incarnation, stored.Stored.State));

        stored.FailNext = new IOException("storage is down");
        await Assert.ThrowsAsync<IOException>(() => journal.Update(r => r.Error = "lost"));
        Assert.Null(journal.Record.Error);
        Assert.False(journal.Fenced);
        await journal.AddEventNow("kept", "an event after a failed write");   // stored: the journal goes on
        Assert.Equal("kept", stored.Stored.Events[^1].Kind);

        // A record of its own incarnation stored in between (its own write, retried by storage): a plain write goes over it.
        stored.WrittenElsewhere(journal.Record.Copy());
        await journal.Update(r => r.Error = "stored over its own incarnation");
        Assert.Equal("stored over its own incarnation", stored.Stored.Error);
        Assert.False(journal.Fenced);

        // Another coordinator claimed the next incarnation first: this one may not claim the same one over it.
        var theirs = journal.Record.Copy();
        theirs.Incarnation = 2;
        stored.WrittenElsewhere(theirs);
        await Assert.ThrowsAsync<StaleCoordinatorException>(() => journal.Update(r => r.Incarnation++, claim: true));
        Assert.True(journal.Fenced);
    }

    [Fact]
    public async Task A_required_registration_must_reach_the_run_list_a_later_one_may_fail()
    {
        var list = new MemoryRunList();
        var journal = new RunJournal(new MemoryState<RunRecord>(new RunRecord()), "r", list, NullLogger.Instance, () => { });
        var spec = Presets.PyTorchMlp with { Epochs = 3 };
        await journal.Register(RunState.Running, spec, 1);
        Assert.Equal(("r", RunState.Running, 1, 3), (list.Summaries[0].RunId, list.Summaries[0].State, list.Summaries[0].EpochsDone, list.Summaries[0].Epochs));

        list.Failing = true;
        await journal.Register(RunState.Running, spec, 2);   // for display: a failure is only logged
        await Assert.ThrowsAsync<TimeoutException>(() => journal.Register(RunState.Running, spec, 2, required: true));
    }

    private sealed class MemoryShard(long[] steps, long checkpoint) : IShard
    {
        public List<(int Incarnation, long Key, long Session, long Step)> Moves { get; } = [];

        public Task<ShardPosition> Attach(RunSpec spec, int incarnation, long coordinatorKey) =>
            Task.FromResult(new ShardPosition(steps, steps.Select(s => s * 0.5).ToArray(), checkpoint, $"silo of {string.Join(",", steps)}"));
        public Task MoveTo(int incarnation, long coordinatorKey, long session, long step)
        {
            Moves.Add((incarnation, coordinatorKey, session, step));
            return Task.CompletedTask;
        }
        public Task Checkpoint(int incarnation, long coordinatorKey, long step) => throw new NotSupportedException();
        public Task<ParameterVersion> Pull(long session, long step) => throw new NotSupportedException();
        public Task<ParameterVersion> GetParameters() => throw new NotSupportedException();
        public Task Retire() => throw new NotSupportedException();
        public Task Forget() => throw new NotSupportedException();
    }

    private sealed class MemoryShards(Dictionary<string, MemoryShard> shards) : IShardFactory
    {
        public IShard Shard(string key) => shards[key];
    }

    [Fact]
    public async Task Shards_settle_on_the_latest_version_they_all_hold_for_one_new_session()
    {
        var shards = new Dictionary<string, MemoryShard>
        {
            ["r/0"] = new([0, 20, 40], 40),
            ["r/1"] = new([0, 20, 40, 60], 60),
            ["r/2"] = new([0, 20, 60], 20),
        };
        var run = new ParameterShards(new MemoryShards(shards), "r", Presets.PyTorchMlp with { ServerShards = 3 }, coordinatorKey: 7);

        var (step, lossSum, checkpoint) = await run.Attach(incarnation: 4);

        Assert.Equal((20L, 10.0, 20L), (step, lossSum, checkpoint));
        Assert.Equal(["silo of 0,20,40", "silo of 0,20,40,60", "silo of 0,20,60"], run.Silos);
        Assert.All(shards.Values, s => Assert.Equal((4, 7L, run.Session, 20L), Assert.Single(s.Moves)));
    }
}
