using System.Diagnostics;
using Orleans.Storage;

namespace Backprop.Grains.Hosting;

public static class StateWrites
{
    /// <summary>
    /// Transient storage failures are retried this long: longer than failure detection takes (a few seconds),
    /// shorter than the 30 s response timeout of the grain call that waits for the write.
    /// </summary>
    public static readonly TimeSpan RetryBudget = TimeSpan.FromSeconds(20);

    /// <summary>
    /// Writes grain state whose only writer is this activation, so its copy is authoritative. If storage
    /// holds another version (in-memory storage whose silo died comes back empty, with another ETag), the ETag
    /// is refreshed and the write repeated, unless <paramref name="superseded"/>(stored, mine) says the stored
    /// version belongs to a newer owner: then <see cref="StaleCoordinatorException"/>. Other failures are
    /// retried with back-off for <see cref="RetryBudget"/>.
    /// </summary>
    public static async Task WriteAuthoritative<T>(this IPersistentState<T> state, Func<T, T, bool>? superseded = null)
    {
        var clock = Stopwatch.StartNew();
        for (int attempt = 1; ; attempt++)
        {
            try
            {
                await state.WriteStateAsync();
                return;
            }
            catch (InconsistentStateException) when (attempt < 3)
            {
                var mine = state.State;
                await state.ReadStateAsync();
                if (superseded is not null && state.RecordExists && superseded(state.State, mine))
                    throw new StaleCoordinatorException("a newer coordinator has written this run's state");
                state.State = mine;
            }
            catch (Exception e) when (clock.Elapsed < RetryBudget && e is not (InconsistentStateException or ArgumentException or InvalidDataException))
            {
                await Task.Delay(TimeSpan.FromMilliseconds(Math.Min(2000, 100 * attempt)));
            }
        }
    }
}
