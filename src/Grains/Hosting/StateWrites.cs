using Orleans.Storage;

namespace Backprop.Grains.Hosting;

public static class StateWrites
{
    /// <summary>
    /// Writes grain state whose only writer is this activation, so its copy is authoritative. If storage
    /// lost the record meanwhile (in-memory storage whose silo died comes back empty, with another ETag),
    /// the ETag is refreshed and the write repeated; transient failures are retried briefly.
    /// </summary>
    public static async Task WriteAuthoritative<T>(this IPersistentState<T> state)
    {
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
                state.State = mine;
            }
            catch (Exception e) when (attempt < 3 && e is OrleansException or TimeoutException)
            {
                await Task.Delay(TimeSpan.FromMilliseconds(200 * attempt));
            }
        }
    }
}
