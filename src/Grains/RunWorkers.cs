using System.Diagnostics;
using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains;

/// <summary>What one window of steps did: the steps every shard applied, with their loss sums, and why it stopped early.</summary>
/// <param name="StepLosses">Each applied step's loss sum, as the shards added it (block order).</param>
/// <param name="Divergence">The step after the applied ones was refused: a non-finite gradient or loss.</param>
/// <param name="Failure">A worker's call failed (a transient failure; the others' steps count).</param>
/// <param name="Blocks">Every block's reply (null where its call failed), for the step profile.</param>
internal sealed record WindowResult(double[] StepLosses, string? Divergence, Exception? Failure, BlockDone?[] Blocks)
{
    public int Applied => StepLosses.Length;
}

/// <summary>
/// The workers of one coordinator and the calls it makes to them: windows of steps (block b of every step to
/// worker b; the shards are the barrier between steps), evaluations, and redos of a failed block on the next worker.
/// Worker activations never move, so when the set of worker silos changes (one joined, left or died) the run takes
/// a new generation of workers, keyed "{runId}/{incarnation}.{generation}/{i}", which placement spreads over the
/// current silos; the old ones idle until collected. The count is the spec's, or one per worker silo where there
/// are more silos: a silo that joins gets work from the next window on. Which worker computes a block never changes
/// a bit (block sums are added in the tree's order).
/// </summary>
internal sealed class RunWorkers(string runId, IWorkerFactory workerFactory, IWorkerSilos workerSilos, RunJournal journal, ILogger logger)
{
    /// <summary>How long one piece of work is retried on other workers: longer than failure detection takes.</summary>
    public static readonly TimeSpan RetryBudget = TimeSpan.FromSeconds(30);
    /// <summary>How long steps go one at a time after a worker failed, unless the worker set changes first.</summary>
    private static readonly TimeSpan FailureRecovery = TimeSpan.FromSeconds(10);
    private const int EvalBlock = Evaluation.Block;

    private IWorker[] _workers = [];
    private string[] _spreadOver = [];
    private int _generation = -1, _workersIncarnation, _failedGeneration = int.MinValue;
    private long _failedAt;
    private readonly SortedSet<string> _silos = new(StringComparer.Ordinal);
    private readonly Dictionary<IWorker, Task> _busy = [];
    // One window's calls and replies, reused from window to window.
    private Task<BlockDone>[] _calls = [];
    private long[] _roundTrips = [], _replied = [];
    // The cut of a full step and of a short last one, for the current worker count.
    private (ChunkBlocks Cut, int[] Starts) _cut, _shortCut;
    private int _cutWorkers;
    private readonly WorkerTimes _times = new();

    /// <summary>The silos whose workers have answered, for the run's status.</summary>
    public string[] Silos => [.. _silos];

    /// <summary>Each worker's compute times over the last steps, and which are stragglers, for the run's status.</summary>
    public WorkerStats[] Stats => _times.Stats;

    /// <summary>Each call's round trip and reply time (timestamps) in the last window, for the step profile.</summary>
    public ReadOnlySpan<long> RoundTrips => _roundTrips;
    public ReadOnlySpan<long> Replied => _replied;

    /// <summary>After a worker's call failed: one step a call, a failed block redone on the next worker, for a while or until the worker set changes.</summary>
    public bool OneStepAtATime => (_failedGeneration == _generation && Stopwatch.GetElapsedTime(_failedAt) < FailureRecovery) || _workers.Any(Busy);

    /// <summary>
    /// The workers for the next window, spread over the worker silos active now. Checked before every window: it
    /// reads this silo's membership and manifest, no call. A re-attach of the same coordinator keeps its workers.
    /// </summary>
    public ValueTask<IWorker[]> For(RunSpec spec, int incarnation)
    {
        var silos = workerSilos.Active();
        if (_workers.Length > 0 && _workersIncarnation == incarnation && (silos.Length == 0 || silos == _spreadOver || silos.SequenceEqual(_spreadOver)))
            return ValueTask.FromResult(_workers);
        return new ValueTask<IWorker[]>(NewGeneration(spec, incarnation, silos));
    }

    private async Task<IWorker[]> NewGeneration(RunSpec spec, int incarnation, string[] silos)
    {
        (_spreadOver, _workersIncarnation) = (silos, incarnation);
        int count = Math.Clamp(Math.Max(spec.Workers, silos.Length), 1, RunSpec.MaxWorkers), generation = ++_generation;
        _workers = Enumerable.Range(0, count).Select(i => workerFactory.Worker($"{runId}/{incarnation}.{generation}/{i}")).ToArray();
        await journal.AddEventNow("workers", $"{count} workers over {silos.Length} worker silos ({string.Join(", ", silos)}), generation {generation}");
        await AddEvents(_times.Reset(generation));
        BackpropMetrics.Workers(runId, _times.Stats);
        return _workers;
    }

    /// <summary>
    /// Block b of <see cref="BlockWork.Steps"/> steps on worker b: each worker pushes its sums to the shards and goes
    /// on to the next step once they answer with the next version. With <paramref name="retry"/> (one step), a failed
    /// block is redone by the next worker while it fails, and the first failure stops the others' retries
    /// (<paramref name="calls"/> is cancelled); without, a failed call ends the window and comes back in the result
    /// with the steps the others confirmed, which are applied. Every call has ended when this returns, but one that was
    /// still running two step bounds after another stopped short: it is left to end on its own, its worker counted busy.
    /// </summary>
    public async Task<WindowResult> RunWindow(IWorker[] workers, BlockWork template, int chunkCount, CancellationTokenSource calls, bool retry)
    {
        var cancel = calls.Token;
        var (cut, starts) = BlocksFor(chunkCount, workers.Length);
        int blocks = cut.Count;
        if (_calls.Length != blocks) (_calls, _roundTrips, _replied) = (new Task<BlockDone>[blocks], new long[blocks], new long[blocks]);
        for (int b = 0; b < blocks; b++)
        {
            _calls[b] = ComputeBlock(workers, b, template with { Block = b, BlockStarts = starts }, retry, cancel);
            if (retry)
                _ = _calls[b].ContinueWith(static (_, source) => ((CancellationTokenSource)source!).Cancel(), calls, CancellationToken.None,
                    TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        }
        var replies = new BlockDone?[blocks];
        Exception? failure = null;
        try
        {
            if (retry) await Task.WhenAll(_calls);
            else await WhenAllOrStalled(_calls, template.Steps, WorkBounds.Step(template.Spec, template.Spec.ChunksPerStep));
        }
        catch (Exception) when (!retry && _calls.Any(c => !c.IsCompleted))
        {
            // A call that did not end well after the others stopped: its worker hangs (it stays out of the windows
            // and of the redos until that call ends).
            failure = new TimeoutException($"a worker's call of {template.Steps} steps from step {template.Step} did not end within two step bounds after the others stopped");
        }
        catch (Exception)
        {
            // The most telling failure counts: a newer owner, divergence, bad input, a moved shard, then the rest
            // (a call cancelled in its retry delay says so).
            failure = _calls.Where(c => !c.IsCompletedSuccessfully).Select(c => c.IsCanceled ? new OperationCanceledException("cancelled") : c.Exception!.InnerException!)
                .OrderBy(Severity).First();
            if (retry || !IsTransient(failure) || cancel.IsCancellationRequested) throw failure;
        }
        finally
        {
            for (int b = 0; b < blocks; b++)
            {
                replies[b] = _calls[b].IsCompletedSuccessfully ? Checked(_calls[b].Result, cut, b, template) : null;
                if (!_calls[b].IsCompleted) _busy[workers[b]] = _calls[b];
            }
            Array.Clear(_calls);
        }
        // Every worker that confirmed a step got the same loss sums from the shards.
        var furthest = replies.Where(r => r is not null).MaxBy(r => r!.Applied);
        string? divergence = replies.FirstOrDefault(r => r?.Divergence is not null)?.Divergence;
        // Worker b computed block b of every step only when nothing was redone: then its compute time is its own.
        if (failure is null && !retry)
        {
            await AddEvents(_times.Add(replies, cut));
            BackpropMetrics.Workers(runId, _times.Stats);
        }
        if (failure is not null)
        {
            (_failedGeneration, _failedAt) = (_generation, Stopwatch.GetTimestamp());
            long at = template.Version + (furthest?.Applied ?? 0);
            await journal.AddEventNow("worker-failed", $"steps from {at}: {failure.Message}; one step a call for a while, a failed block redone on the next worker");
        }
        return new WindowResult(furthest?.StepLosses ?? [], divergence, failure, replies);
    }

    private async Task AddEvents(List<(string Kind, string Message)> events)
    {
        foreach (var (kind, message) in events) await journal.AddEventNow(kind, message);
    }

    /// <summary>
    /// The test set cut into blocks of <see cref="EvalBlock"/> samples, block b to worker b mod W, the partial
    /// results added in block order: counts add up exactly, and the loss (a double sum) does not depend on how
    /// many workers there are. A failed block is redone by another worker.
    /// </summary>
    public async Task<Evaluation> Evaluate(IWorker[] workers, EvalWork template, int testCount, CancellationToken cancel)
    {
        int blocks = (testCount + EvalBlock - 1) / EvalBlock;
        // A worker answers its calls one after another, and the bound counts from the call's start: a block may wait
        // behind every other one (its worker's share, and the redos of a lost worker's).
        var bound = Capped(WorkBounds.Evaluation(template.Spec, EvalBlock) * blocks);
        var calls = Enumerable.Range(0, blocks).Select(b =>
        {
            int start = b * EvalBlock, end = Math.Min(testCount, start + EvalBlock);
            return WithRetry(workers, b % workers.Length, new WorkLabel(-1, start, end), template with { Start = start, End = end },
                bound, static (worker, work) => worker.Evaluate(work), cancel);
        });
        var partials = await Task.WhenAll(calls);
        return partials.Aggregate((a, b) => a.Add(b));
    }

    /// <summary>Which of a window's failures decides what the coordinator does: a newer owner, divergence, bad input, a moved shard, then the rest.</summary>
    private static int Severity(Exception e) => e switch
    {
        StaleCoordinatorException => 0,
        RunDivergedException => 1,
        ArgumentException or MissingEpochsException => 2,
        ShardMovedException => 3,
        OperationCanceledException => 5,
        _ => 4,
    };

    /// <summary>A failure that another worker or a later try may not have: anything but bad input, a newer owner, a moved shard or a cancel.</summary>
    public static bool IsTransient(Exception e) =>
        e is not (ArgumentException or StaleCoordinatorException or RunDivergedException or OperationCanceledException or ShardMovedException
            or MissingEpochsException);

    /// <summary>A worker's reply as the coordinator relies on it: its block, and no more steps than it was given.</summary>
    private static BlockDone Checked(BlockDone reply, ChunkBlocks cut, int block, BlockWork work)
    {
        if (reply.FirstChunk != cut.First(block))
            throw new InvalidDataException($"step {work.Step}: block {block} came back for chunk {reply.FirstChunk}, not {cut.First(block)}");
        if (reply.StepLosses is null || reply.StepLosses.Length > work.Steps || reply.StepLosses.Any(l => !double.IsFinite(l)))
            throw new InvalidDataException($"steps from {work.Step}: block {block} came back with {reply.StepLosses?.Length.ToString() ?? "no"} step losses for {work.Steps} steps, or a non-finite one");
        return reply;
    }

    /// <summary>
    /// Waits for every call of a window; once one has ended short of the window (or failed), the others can go at most
    /// a step further (they wait at the shards for its block), so they get two step bounds more, not their whole window's.
    /// </summary>
    private static async Task WhenAllOrStalled(Task<BlockDone>[] calls, int steps, TimeSpan stepBound)
    {
        var pending = new List<Task<BlockDone>>(calls);
        while (pending.Count > 0)
        {
            var done = await Task.WhenAny(pending);
            pending.Remove(done);
            if (pending.Count > 0 && (!done.IsCompletedSuccessfully || done.Result.Applied < steps))
            {
                await Task.WhenAll(pending).WaitAsync(stepBound * 2);
                break;
            }
        }
        await Task.WhenAll(calls);   // the failures, if any
    }

    /// <summary>A worker whose abandoned call (past its bound) has not ended: it answers nothing else until then.</summary>
    private bool Busy(IWorker worker)
    {
        if (!_busy.TryGetValue(worker, out var call)) return false;
        if (!call.IsCompleted) return true;
        _busy.Remove(worker);
        return false;
    }

    private static TimeSpan Capped(TimeSpan bound) => bound < WorkBounds.Longest ? bound : WorkBounds.Longest;

    /// <summary>The cut of a step of <paramref name="chunks"/> chunks over the workers, with its starts as the shards get them; made once per worker count.</summary>
    private (ChunkBlocks Cut, int[] Starts) BlocksFor(int chunks, int workers)
    {
        if (_cutWorkers != workers) (_cut, _shortCut, _cutWorkers) = (default, default, workers);
        if (_cut.Cut?.Chunks == chunks) return _cut;
        if (_shortCut.Cut?.Chunks == chunks) return _shortCut;
        var cut = ChunkBlocks.For(chunks, workers);
        var made = (cut, cut.Starts.ToArray());
        if (_cut.Cut is null || chunks > _cut.Cut.Chunks) (_cut, _shortCut) = (made, _cut);
        else _shortCut = made;
        return made;
    }

    /// <summary>Block <see cref="BlockWork.Block"/> on worker b; with <paramref name="retry"/>, then on the next workers while it fails.</summary>
    private async Task<BlockDone> ComputeBlock(IWorker[] workers, int b, BlockWork work, bool retry, CancellationToken cancel)
    {
        long start = Stopwatch.GetTimestamp();
        var bound = WorkBounds.Window(work.Spec, work.BlockStarts.Length > b + 1 ? work.BlockStarts[b + 1] - work.FirstChunk : work.Spec.ChunksPerStep - work.FirstChunk, work.Steps);
        // Redone blocks wait behind the next worker's own (a worker answers one call at a time; the bound counts from the start).
        if (retry) bound = Capped(bound * work.BlockStarts.Length);
        var reply = retry
            ? await WithRetry(workers, b, new WorkLabel(work.Step, work.FirstChunk, -1), work, bound, static (worker, work) => worker.ComputeBlock(work), cancel)
            : await Abandoning(workers[b], workers[b].ComputeBlock(work), bound);
        long end = Stopwatch.GetTimestamp();
        (_roundTrips[b], _replied[b]) = (end - start, end);
        _silos.Add(reply.Silo);
        return reply;
    }

    /// <summary>What a retried call computes, formatted only for the event log.</summary>
    private readonly record struct WorkLabel(int Step, int First, int End)
    {
        public override string ToString() => Step < 0 ? $"evaluation of test samples [{First}, {End})" : $"step {Step} block from chunk {First}";
    }

    /// <summary>
    /// Runs <paramref name="call"/> on worker <paramref name="first"/>, and on the next workers in turn while it fails,
    /// for up to <see cref="RetryBudget"/>; a call that has not answered within <paramref name="bound"/> counts as failed (it
    /// may still be computing: its late pushes are duplicates the shards ignore). Bad input (ArgumentException) is never retried.
    /// </summary>
    private async Task<T> WithRetry<TWork, T>(IWorker[] workers, int first, WorkLabel what, TWork work, TimeSpan bound, Func<IWorker, TWork, Task<T>> call, CancellationToken cancel)
    {
        var failing = new Stopwatch();
        for (int attempt = 0; ; attempt++)
        {
            int index = (first + attempt) % workers.Length;
            // Not a worker still busy with an abandoned call (unless every one is): this call would wait behind it.
            for (int k = 0; k < workers.Length && Busy(workers[index]); k++) index = (index + 1) % workers.Length;
            try
            {
                // Not cancelled with the window: a failed window drains every call before the coordinator goes on.
                var result = await Abandoning(workers[index], call(workers[index], work), bound);
                if (attempt > 0) await journal.AddEventNow("redone", $"{what} redone on worker {index}, {failing.Elapsed.TotalSeconds:F1} s after the first failure");
                return result;
            }
            catch (Exception e) when (IsTransient(e) && !cancel.IsCancellationRequested && (failing.IsRunning || Start(failing)) && failing.Elapsed < RetryBudget)
            {
                logger.LogWarning("Run {Run}: {What} failed on worker {Worker} ({Error}); retrying on the next worker", runId, what, index, e.Message);
                await journal.AddEventNow("worker-failed", $"{what} failed on worker {index}: {e.Message}");
                await Task.Delay(TimeSpan.FromMilliseconds(Math.Min(1000, 100 * (attempt + 1))), cancel);
            }
        }
    }

    /// <summary>The call's result within <paramref name="bound"/>; past it the call is left running and its worker counted busy.</summary>
    private async Task<T> Abandoning<T>(IWorker worker, Task<T> call, TimeSpan bound)
    {
        try
        {
            return await call.WaitAsync(bound);
        }
        catch (TimeoutException) when (!call.IsCompleted)
        {
            _busy[worker] = call;
            throw;
        }
    }

    private static bool Start(Stopwatch clock)
    {
        clock.Restart();
        return true;
    }
}
