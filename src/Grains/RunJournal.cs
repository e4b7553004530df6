using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains;

/// <summary>
/// A run's stored record (spec, state, epoch results, events, incarnation) and the only way it changes: a change is
/// in memory only once it is stored, and a coordinator that meets a newer one's record is fenced off for good (it
/// never writes again; <paramref name="onFenced"/> lets its activation go). Also keeps the cluster's run list up to date.
/// </summary>
internal sealed class RunJournal(IStoredState<RunRecord> stored, string runId, IRunList runList, ILogger logger, Action onFenced)
{
    private const int MaxEvents = 200;
    private readonly SemaphoreSlim _writes = new(1, 1);

    public RunRecord Record => stored.State;

    /// <summary>A newer coordinator owns the run: this activation never runs a loop or writes the record again.</summary>
    public bool Fenced { get; private set; }

    /// <summary>This activation's record is older than the stored one: the caller asks again and reaches a fresh activation.</summary>
    public void ThrowIfFenced()
    {
        if (Fenced) throw new StaleCoordinatorException($"run {runId}: this activation was replaced by a newer coordinator; ask again");
    }

    public void Fence()
    {
        Fenced = true;
        onFenced();
    }

    /// <summary>
    /// Changes the record in memory only once the change is stored (a failed write leaves the run as it was).
    /// <paramref name="claim"/>: this write takes the run over (a new incarnation).
    /// </summary>
    public async Task Update(Action<RunRecord> change, bool claim = false)
    {
        await _writes.WaitAsync();
        var before = stored.State;
        try
        {
            // After a conflict the newer owner's version counts as read: a write from here would go through, over its record.
            if (Fenced) throw new StaleCoordinatorException($"run {runId}: this coordinator was fenced off by a newer one");
            var next = before.Copy();
            change(next);
            stored.State = next;
            // Fenced: a record written by a newer coordinator is not overwritten (nor an equal one, when claiming).
            await stored.WriteAuthoritative((theirs, mine) => claim ? theirs.Incarnation >= mine.Incarnation : theirs.Incarnation > mine.Incarnation);
        }
        catch (StaleCoordinatorException)
        {
            stored.State = before;
            Fence();
            throw;
        }
        catch
        {
            stored.State = before;
            throw;
        }
        finally
        {
            _writes.Release();
        }
    }

    /// <summary>Stores an event now; a failed write costs the event, never the run.</summary>
    public async Task AddEventNow(string kind, string message)
    {
        try
        {
            await Update(r => AddEvent(r, kind, message));
        }
        catch (Exception e) when (e is not StaleCoordinatorException)
        {
            logger.LogWarning("Run {Run}: could not store event {Kind} ({Error}): {Message}", runId, kind, e.Message, message);
        }
    }

    public static void AddEvent(RunRecord r, string kind, string message)
    {
        r.Events.Add(new RunEvent(DateTime.UtcNow, kind, message));
        BackpropMetrics.Event(kind);
        if (r.Events.Count > MaxEvents) r.Events.RemoveRange(1, r.Events.Count - MaxEvents);   // the first ("started") stays
    }

    /// <summary>
    /// The run's line in the run list. <paramref name="required"/>: the first (at start or resume), which the silos'
    /// watchdogs rely on to keep the run going; later ones are for display and may fail.
    /// </summary>
    public async Task Register(RunState state, RunSpec spec, int epochsDone, bool required = false)
    {
        try
        {
            double? accuracy = Record.Epochs.Count > 0 ? Record.Epochs[^1].TestAccuracy : null;
            await runList.Update(new RunSummary(runId, state, epochsDone, spec.Epochs, accuracy, DateTime.UtcNow));
        }
        catch (Exception e) when (!required)
        {
            logger.LogWarning("Run {Run}: could not update the run list ({Error})", runId, e.Message);
        }
    }
}
