namespace Backprop.Core.Numerics;

/// <summary>
/// Splits rows (of a product, or elements of a vector) over a fixed set of threads. Threads are kept
/// (spinning briefly, then sleeping) because a training step runs several products of a few
/// microseconds each. Rows, never the reduction, are split, so results do not depend on the thread count.
/// An exception in any part, on any thread, ends up with the caller once every part has ended: a kept thread
/// never dies of it (an exception escaping a thread would end the process, a silo with it).
/// </summary>
public sealed class RowParallel : IDisposable
{
    private const int SpinLimit = 20_000;
    private readonly Thread[] _workers;
    private readonly SemaphoreSlim[] _wake;
    private readonly int[] _sleeping;
    private readonly int[] _bounds;
    private Action<int, int>? _job;
    // A Run<TState> job: its state, its delegate, and the thunk that calls one with the other without knowing TState.
    private object? _state;
    private Delegate? _stateJob;
    private Action<RowParallel, int, int, int>? _callStateJob;
    private int _generation;
    private int _pending;
    private volatile bool _disposed;
    private Exception? _failure;

    public RowParallel(int threads)
    {
        if (threads < 1 || threads > ResourceLimits.MaxThreadsPerWorker)
            throw new ArgumentOutOfRangeException(nameof(threads), $"threads {threads} is outside 1..{ResourceLimits.MaxThreadsPerWorker}");
        Threads = threads;
        _bounds = new int[threads + 1];
        _sleeping = new int[threads];
        _wake = Enumerable.Range(0, threads).Select(_ => new SemaphoreSlim(0)).ToArray();
        _workers = Enumerable.Range(1, threads - 1).Select(w => new Thread(() => Work(w)) { IsBackground = true, Name = $"backprop-row-{w}" }).ToArray();
        foreach (var t in _workers) t.Start();
    }

    public int Threads { get; }

    /// <summary>
    /// Calls rows(from, to) over a partition of [0, m) with boundaries on multiples of
    /// <paramref name="align"/> (4 keeps 4-row register tiles whole). The delegate should be cached by the
    /// caller: a new lambda per call would allocate.
    /// </summary>
    public void Run(int m, Action<int, int> rows, int align = 4)
    {
        if (!Split(m, align))
        {
            rows(0, m);
            return;
        }
        (_job, _stateJob) = (rows, null);
        Dispatch();
        try
        {
            rows(_bounds[0], _bounds[1]);
        }
        catch (Exception e)
        {
            Interlocked.CompareExchange(ref _failure, e, null);
        }
        Join();
        ThrowIfFailed();
    }

    /// <summary>
    /// As <see cref="Run(int, Action{int, int}, int)"/>, calling rows(state, thread, from, to) with the index of the
    /// calling thread (0 is the caller; below the partition's part count), for work that keeps per-thread
    /// buffers, and <paramref name="state"/>, the operation's inputs passed explicitly. A static lambda or a
    /// delegate cached by the caller allocates nothing; <paramref name="state"/> is held until the call returns.
    /// </summary>
    public void Run<TState>(int m, TState state, Action<TState, int, int, int> rows, int align = 4) where TState : class
    {
        if (!Split(m, align))
        {
            rows(state, 0, 0, m);
            return;
        }
        (_job, _state, _stateJob, _callStateJob) = (null, state, rows, StateJob<TState>.Call);
        Dispatch();
        try
        {
            rows(state, 0, _bounds[0], _bounds[1]);
        }
        catch (Exception e)
        {
            Interlocked.CompareExchange(ref _failure, e, null);
        }
        Join();
        _state = null;
        ThrowIfFailed();
    }

    /// <summary>The first exception of the parts just joined, thrown on the caller's thread with its own stack.</summary>
    private void ThrowIfFailed()
    {
        if (Interlocked.Exchange(ref _failure, null) is { } failure)
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(failure).Throw();
    }

    /// <summary>One thunk per state type, made once: a worker calls the job through it.</summary>
    private static class StateJob<TState> where TState : class
    {
        public static readonly Action<RowParallel, int, int, int> Call = static (parallel, thread, from, to) =>
            ((Action<TState, int, int, int>)parallel._stateJob!)((TState)parallel._state!, thread, from, to);
    }

    /// <summary>How many parts <see cref="Run{TState}(int, TState, Action{TState, int, int, int}, int)"/> splits m rows into: 1 when too few to pay for a hand-off.</summary>
    public int PartsFor(int m, int align = 4) => Threads == 1 || m < 2 * align * Threads ? 1 : Threads;

    /// <summary>Part <paramref name="part"/> of <paramref name="parts"/> of [0, m), as Run splits it.</summary>
    public static (int From, int To) Bounds(int m, int part, int parts, int align = 4) =>
        (Start(m, part, parts, align), Start(m, part + 1, parts, align));

    private static int Start(int m, int part, int parts, int align) => part == parts ? m : (int)((long)m * part / parts) / align * align;

    private bool Split(int m, int align)
    {
        if (PartsFor(m, align) == 1) return false;
        for (int t = 0; t <= Threads; t++) _bounds[t] = Start(m, t, Threads, align);
        return true;
    }

    private void Dispatch()
    {
        Volatile.Write(ref _pending, Threads - 1);
        Interlocked.Increment(ref _generation);
        for (int w = 1; w < Threads; w++)
            if (Volatile.Read(ref _sleeping[w]) == 1) _wake[w].Release();
    }

    private void Join()
    {
        var spin = new SpinWait();
        while (Volatile.Read(ref _pending) != 0) spin.SpinOnce(sleep1Threshold: -1);
    }

    private void Work(int w)
    {
        int seen = 0;
        while (true)
        {
            int spins = 0;
            while (Volatile.Read(ref _generation) == seen)
            {
                if (++spins < SpinLimit)
                {
                    Thread.SpinWait(10);
                    continue;
                }
                Interlocked.Exchange(ref _sleeping[w], 1);
                if (Volatile.Read(ref _generation) == seen) _wake[w].Wait();
                Interlocked.Exchange(ref _sleeping[w], 0);
                spins = 0;
            }
            seen = Volatile.Read(ref _generation);
            if (_disposed) return;
            try
            {
                if (_stateJob is not null) _callStateJob!(this, w, _bounds[w], _bounds[w + 1]);
                else _job!(_bounds[w], _bounds[w + 1]);
            }
            catch (Exception e)
            {
                Interlocked.CompareExchange(ref _failure, e, null);
            }
            Interlocked.Decrement(ref _pending);
        }
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Interlocked.Increment(ref _generation);
        foreach (var s in _wake) s.Release();
    }
}
