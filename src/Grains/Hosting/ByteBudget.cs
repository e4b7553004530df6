namespace Backprop.Grains.Hosting;

/// <summary>
/// Bytes a data lane may hold for requests it has read and not yet handed over: a reader takes a frame's bytes before
/// it allocates them and waits, first come first served, while they are not free.
/// </summary>
internal sealed class ByteBudget(long capacity)
{
    private long _free = capacity;
    private readonly long _capacity = capacity;
    private readonly LinkedList<(long Bytes, TaskCompletionSource Ready)> _waiting = new();

    /// <summary>Bytes free now: for tests (every byte taken is given back once its requests are done).</summary>
    internal long Free
    {
        get { lock (_waiting) return _free; }
    }

    public Task Take(long bytes, CancellationToken cancel)
    {
        if (bytes < 0 || bytes > _capacity) throw new ArgumentOutOfRangeException(nameof(bytes), $"{bytes} bytes of a budget of {_capacity}");
        TaskCompletionSource ready;
        lock (_waiting)
        {
            if (_waiting.Count == 0 && _free >= bytes)
            {
                _free -= bytes;
                return Task.CompletedTask;
            }
            ready = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            _waiting.AddLast((bytes, ready));
        }
        // A cancelled wait gives its place up; Give passes over it (the bytes were never taken).
        var registration = cancel.Register(() =>
        {
            if (ready.TrySetCanceled(cancel)) Give(0);
        });
        // Let go of the registration once the wait ends: the token is the lane's, alive as long as the silo.
        _ = ready.Task.ContinueWith(static (_, state) => ((CancellationTokenRegistration)state!).Dispose(), registration,
            CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
        return ready.Task;
    }

    public void Give(long bytes)
    {
        lock (_waiting)
        {
            _free += bytes;
            while (_waiting.First is { } first && (first.Value.Ready.Task.IsCompleted || _free >= first.Value.Bytes))
            {
                _waiting.RemoveFirst();
                if (first.Value.Ready.TrySetResult()) _free -= first.Value.Bytes;
            }
        }
    }
}
