using System.Diagnostics;
using Backprop.Core;
using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains;

/// <summary>
/// The parameters of a run's best epoch so far by validation accuracy (--keep best): stored apart from the record,
/// which is written far more often, and never overwritten by a later, worse epoch.
/// </summary>
[GenerateSerializer]
public sealed class BestParameters
{
    [Id(0)] public int Epoch { get; set; }
    [Id(1)] public long Step { get; set; }
    [Id(2)] public FloatPayload? Parameters { get; set; }
}

[GenerateSerializer]
public sealed class RunRecord
{
    [Id(0)] public RunSpec? Spec { get; set; }
    [Id(1)] public RunState State { get; set; }
    [Id(2)] public List<EpochResult> Epochs { get; set; } = [];
    [Id(3)] public string? Error { get; set; }
    /// <summary>How many coordinators have driven this run; the parameter-server shards refuse blocks from older ones.</summary>
    [Id(4)] public int Incarnation { get; set; }
    [Id(5)] public List<RunEvent> Events { get; set; } = [];
    [Id(6)] public string? DatasetSha256 { get; set; }
    /// <summary>
    /// A random number drawn by each incarnation as it claims the run, never sent to a client: the shards attach only to
    /// a caller that presents it, so nobody else can knock the run's coordinator off its shards with the incarnation.
    /// </summary>
    [Id(7)] public long CoordinatorKey { get; set; }

    public RunRecord Copy() => new()
    {
        Spec = Spec, State = State, Epochs = [.. Epochs], Error = Error, Incarnation = Incarnation, Events = [.. Events], DatasetSha256 = DatasetSha256,
        CoordinatorKey = CoordinatorKey,
    };
}

/// <summary>
/// The coordinator of one run: a thin grain over its record (<see cref="RunJournal"/>), its workers
/// (<see cref="RunWorkers"/>: windows of steps, evaluations, redos) and its parameter-server shards
/// (<see cref="ParameterShards"/>). Its training loop is background work on this activation (not a grain call), so
/// status and cancel calls are answered while it runs. Each window (<see cref="StepWindow"/>): the workers get the
/// version, the first step and the number of steps; block b of every step goes to worker b, which pushes its sums
/// to the shards and goes on from step to step with the shards as the barrier, so this grain never carries a vector
/// and makes one call per worker for many steps. When this grain's silo dies, the next activation (started by a
/// silo's <see cref="RunWatchdog"/> or any call) settles the shards on the latest version they all hold and goes on:
/// the data order is a function of (seed, epoch) and every step of the parameters and step number, so the bits
/// are the same.
/// </summary>
public sealed class RunGrain(
    DatasetCache datasets,
    WorkerSettings settings,
    ILocalSiloDetails silo,
    WorkerSilos workerSilos,
    [PersistentState(StoredRuns.StateName, SiloSetup.StorageName)] IPersistentState<RunRecord> record,
    [PersistentState("best", SiloSetup.StorageName)] IPersistentState<BestParameters> best,
    ILogger<RunGrain> logger) : Grain, IRunGrain
{
    private static readonly TimeSpan MaxWait = TimeSpan.FromSeconds(10);
    /// <summary>How long one call to the workers runs (a window of steps), about.</summary>
    private static readonly TimeSpan WindowTarget = TimeSpan.FromMilliseconds(200);
    private const int MaxWindow = 512;

    private RunJournal? _journal;
    private RunWorkers? _runWorkers;
    private Task? _loop;
    private CancellationTokenSource _cancel = new();
    private CancellationTokenSource _stop = new();
    private TaskCompletionSource _finished = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _epoch;
    private int _stepInEpoch;
    private int _stepsPerEpoch;
    private long _step;
    private string[] _shardSilos = [];
    /// <summary>Measured over the last window: sizes the next one.</summary>
    private double _secondsPerStep;

    private RunJournal Journal => _journal ??= new RunJournal(record, RunId, GrainFactory, logger, DeactivateOnIdle);
    private RunWorkers Workers => _runWorkers ??= new RunWorkers(RunId, GrainFactory, workerSilos, Journal, logger);
    private RunRecord Record => Journal.Record;
    private string RunId => this.GetPrimaryKeyString();
    private string SiloEndpoint => silo.SiloAddress.Endpoint.ToString();
    private bool LoopActive => _loop is { IsCompleted: false };

    public override Task OnActivateAsync(CancellationToken cancellationToken)
    {
        KeepGoing();
        return Task.CompletedTask;
    }

    /// <summary>
    /// A run stored as running with no loop here has lost its coordinator (its silo died, the whole cluster
    /// stopped, or this loop could not store its end): go on from the last checkpoint. Called on activation
    /// and by status calls, which the silos' watchdogs make for every running run.
    /// </summary>
    private void KeepGoing()
    {
        if (Record.State == RunState.Running && settings.KeepRunsGoing && !LoopActive && !Journal.Fenced) StartLoop(resumed: true);
    }

    public override async Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        if (!LoopActive) return;
        // The silo is stopping: leave the run marked running, so that a survivor (or a restart) continues it.
        _stop.Cancel();
        await Task.WhenAny(_loop!, Task.Delay(Timeout.Infinite, cancellationToken));
    }

    public async Task<RunStatus> Start(RunSpec spec)
    {
        if (spec is null) throw new ArgumentException("no run spec");
        RunIds.Validate(RunId);
        Journal.ThrowIfFenced();
        if (Record.Spec is { } existing)
        {
            // The stored spec has the run's length resolved (RunSpec.Resolve); the caller's need not.
            if (existing != (spec.StepsPerEpoch == 0 ? spec with { StepsPerEpoch = existing.StepsPerEpoch } : spec))
                throw new ArgumentException($"run id '{RunId}' is already used by another run");
            if (Record.State != RunState.NotStarted) return Status(0);
        }
        spec.Validate();
        var (data, sha) = await datasets.Current(spec.Dataset);
        spec.ValidateAgainst(data.Train);
        spec = spec.Resolve(spec.TrainCount(data.Train.Count));

        // Stored before it is registered (the registry lists only stored runs), but as running only once registered:
        // a run the registry does not know would not be continued after its silo dies.
        bool created = Record.Spec is null;
        await Journal.Update(r => { r.Spec = spec; r.DatasetSha256 = sha; });
        try
        {
            await Journal.Register(RunState.Running, spec, 0, required: true);
        }
        catch when (created)
        {
            // Never listed, so never deleted by the retention: a refused start leaves no record behind (best effort).
            try { await record.ClearStateAsync(); } catch (Exception e) { logger.LogWarning("Run {Run}: could not remove the record of a refused start ({Error})", RunId, e.Message); }
            throw;
        }
        await Journal.Update(r =>
        {
            r.State = RunState.Running;
            RunJournal.AddEvent(r, "started", $"{spec.Model.Describe()}, batch {spec.BatchSize}, chunk {spec.ChunkSize}, {spec.Workers} workers, {spec.Epochs} epochs, data sha256 {sha[..12]}");
        });
        StartLoop(resumed: false);
        logger.LogInformation("Run {Run} started: {Model}, batch {Batch}, chunk {Chunk}, {Workers} workers, {Epochs} epochs",
            RunId, spec.Model.Describe(), spec.BatchSize, spec.ChunkSize, spec.Workers, spec.Epochs);
        return Status(0);
    }

    public Task<RunStatus> GetStatus(int knownEpochs = 0)
    {
        KeepGoing();
        return Task.FromResult(Status(knownEpochs));
    }

    public async Task<RunStatus> WaitForFinish(TimeSpan maxWait, int knownEpochs = 0)
    {
        var wait = maxWait < TimeSpan.Zero ? TimeSpan.Zero : maxWait > MaxWait ? MaxWait : maxWait;
        if (LoopActive) await Task.WhenAny(_finished.Task, Task.Delay(wait));
        // Stored as running with no loop here (one is about to be restarted, or runs on another activation): nothing
        // here will finish, but a follower calling again at once would spin.
        else if (Record.State == RunState.Running) await Task.Delay(wait);
        return Status(knownEpochs);
    }

    public async Task<RunStatus> Cancel()
    {
        Journal.ThrowIfFenced();
        if (LoopActive)
        {
            _cancel.Cancel();
        }
        else if (Record.State == RunState.Running)
        {
            // Stored as running but no loop here (an interrupted embedded run): stop it for good.
            await Journal.Update(r => { r.State = RunState.Cancelled; RunJournal.AddEvent(r, "cancelled", "cancelled while no coordinator was running it"); });
            await Journal.Register(RunState.Cancelled, Record.Spec!, Record.Epochs.Count);
        }
        return Status(0);
    }

    /// <summary>How long a resume waits for a cancelled loop to stop: under the 30 s response timeout of the call.</summary>
    private static readonly TimeSpan ResumeWait = TimeSpan.FromSeconds(20);

    public async Task<RunStatus> Resume()
    {
        var spec = Record.Spec ?? throw new ArgumentException($"no run '{RunId}'");
        Journal.ThrowIfFenced();
        if (LoopActive)
        {
            if (!_cancel.IsCancellationRequested) return Status(0);   // running: nothing to continue
            // Cancelled and still stopping (its calls end first, then it stores the state): resume once it has.
            if (await Task.WhenAny(_finished.Task, Task.Delay(ResumeWait)) != _finished.Task || LoopActive)
                throw new InvalidOperationException($"run '{RunId}' is still stopping after its cancel; resume it again in a moment");
        }
        if (Record.State is RunState.Completed or RunState.Diverged) return Status(0);   // nothing to continue
        await Journal.Register(RunState.Running, spec, Record.Epochs.Count, required: true);
        await Journal.Update(r => { r.State = RunState.Running; r.Error = null; RunJournal.AddEvent(r, "resume", $"resume requested (was {Record.State.ToString().ToLowerInvariant()})"); });
        StartLoop(resumed: true);
        return Status(0);
    }

    public async Task<TrainedModel> GetModel()
    {
        var spec = Record.Spec ?? throw new ArgumentException($"no run '{RunId}'");
        // The best epoch's copy once the run has one; the shards hold the last epoch's.
        if (spec.KeepBest && best.State.Parameters is { } kept) return new TrainedModel(spec, kept, best.State.Step);
        var current = await new ParameterShards(GrainFactory, RunId, spec).Gather(step: null);
        return new TrainedModel(spec, current.Parameters, current.Step);
    }

    public async Task Forget()
    {
        Journal.ThrowIfFenced();
        if (!await GrainFactory.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key).IsBeingDeleted(RunId))
            throw new InvalidOperationException($"run '{RunId}' is not being deleted: only runs the run list's retention policy evicted are");
        if (Record.Spec is not { } spec) return;   // deleted already (a retry)
        // The list evicts only finished runs and refuses to list them again, but the loop may still be retiring the shards: the list retries.
        if (LoopActive || Record.State == RunState.Running)
            throw new InvalidOperationException($"run '{RunId}' has not finished ending; its deletion is retried");
        // The shards first: a deletion cut short leaves the record, which the list's retry finds with the shard count.
        await new ParameterShards(GrainFactory, RunId, spec).Forget();
        // The best epoch's copy before the record, for the same reason.
        if (spec.KeepBest) await best.ClearStateAsync();
        await record.ClearStateAsync();
        logger.LogInformation("Run {Run} deleted (evicted from the run list by its retention policy)", RunId);
        DeactivateOnIdle();
    }

    private RunStatus Status(int knownEpochs)
    {
        var r = record.State;
        var epochs = r.Epochs.Skip(Math.Max(0, knownEpochs)).ToArray();
        return new RunStatus(RunId, r.State, r.Spec, _epoch, _stepInEpoch, _stepsPerEpoch, epochs, r.Error,
            Workers.Silos, SiloEndpoint, _shardSilos, _step > 0 || r.Epochs.Count == 0 ? _step : r.Epochs[^1].Steps, r.Events.ToArray(), r.Epochs.Count, Workers.Stats);
    }

    private void StartLoop(bool resumed)
    {
        (_cancel, _stop) = (new CancellationTokenSource(), new CancellationTokenSource());
        _finished = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        DelayDeactivation(TimeSpan.FromDays(30));
        _loop = RunLoop(resumed, _cancel.Token, _stop.Token);
    }

    private async Task RunLoop(bool resumed, CancellationToken cancel, CancellationToken stop)
    {
        await Task.Yield();   // out of the caller (activation or a grain call), onto this activation's queue
        var spec = Record.Spec!;
        using var either = CancellationTokenSource.CreateLinkedTokenSource(cancel, stop);
        RunState final;
        string? error = null;
        try
        {
            // This loop's incarnation, stored before it acts: a coordinator still running elsewhere is fenced off.
            await Journal.Update(r => (r.Incarnation, r.CoordinatorKey) = (r.Incarnation + 1, Secrets.NewLong()), claim: true);
            await Train(spec, Record.Incarnation, resumed, either.Token);
            final = RunState.Completed;
        }
        catch (OperationCanceledException) when (cancel.IsCancellationRequested)
        {
            final = RunState.Cancelled;
        }
        catch (Exception e) when (stop.IsCancellationRequested)
        {
            // Whatever the last call threw while the silo shut down (its grains go first): the run stays running.
            logger.LogInformation("Run {Run}: coordinator stopping with its silo ({Error}); the run goes on elsewhere", RunId, e.Message);
            EndLoop();
            return;
        }
        catch (StaleCoordinatorException e)
        {
            logger.LogWarning("Run {Run}: {Reason}; this coordinator stops", RunId, e.Message);
            EndLoop();
            Journal.Fence();
            return;
        }
        catch (RunDivergedException e)
        {
            (final, error) = (RunState.Diverged, e.Message);
        }
        catch (Exception e) when (cancel.IsCancellationRequested)
        {
            // Cancelled while a step failed: the failure is what the cancelled retries left, not the run's end.
            logger.LogInformation("Run {Run}: cancelled while a call failed ({Error})", RunId, e.Message);
            final = RunState.Cancelled;
        }
        catch (Exception e)
        {
            logger.LogError(e, "Run {Run} failed", RunId);
            (final, error) = (RunState.Failed, e.Message);
        }
        if (Journal.Fenced)
        {
            // Fenced while ending (a write on the way out met the newer owner): nothing more is this activation's to store.
            EndLoop();
            return;
        }
        logger.LogInformation("Run {Run} {State}", RunId, final);
        try
        {
            if (final == RunState.Cancelled && _step > 0)   // keep the progress, so that `resume` continues from here
                await new ParameterShards(GrainFactory, RunId, spec, Record.CoordinatorKey).Checkpoint(Record.Incarnation, _step);
        }
        catch (Exception e)
        {
            logger.LogWarning("Run {Run}: checkpoint at cancel failed ({Error})", RunId, e.Message);
        }
        try
        {
            await Journal.Update(r =>
            {
                r.State = final;
                r.Error = error;
                RunJournal.AddEvent(r, final.ToString().ToLowerInvariant(), error ?? $"after {r.Epochs.Count} epochs");
            });
            await Journal.Register(final, spec, Record.Epochs.Count);
        }
        catch (Exception e)
        {
            // Still stored as running: the next status call or watchdog sweep starts a loop that finds the end again.
            logger.LogError(e, "Run {Run}: could not store its final state", RunId);
            EndLoop();
            return;
        }
        if (final == RunState.Completed) await Retire(spec);
        EndLoop();
    }

    /// <summary>
    /// A completed run keeps its final parameters and nothing else: the shards drop their other checkpoint slot and
    /// their buffers. A failure costs storage, never the run.
    /// </summary>
    private async Task Retire(RunSpec spec)
    {
        try
        {
            await new ParameterShards(GrainFactory, RunId, spec).Retire();
        }
        catch (Exception e)
        {
            logger.LogWarning("Run {Run}: its shards kept their older checkpoints ({Error})", RunId, e.Message);
        }
    }

    private void EndLoop()
    {
        BackpropMetrics.RunLeft(RunId);
        _finished.TrySetResult();
        DelayDeactivation(TimeSpan.FromSeconds(-1));   // negative: back to normal idle collection
    }

    /// <summary>
    /// Trains from wherever the shards stand. When a shard's silo is lost, its next activation is at its last
    /// checkpoint: the coordinator attaches to all shards again and recomputes from the version they share.
    /// </summary>
    private async Task Train(RunSpec spec, int incarnation, bool resumed, CancellationToken cancel)
    {
        // Restarted by every applied step: the budget counts time without progress, from the first failure on.
        var failing = new Stopwatch();
        while (true)
        {
            try
            {
                await TrainFromServer(spec, incarnation, resumed, failing, cancel);
                return;
            }
            catch (Exception e) when ((RunWorkers.IsTransient(e) || e is ShardMovedException) && !cancel.IsCancellationRequested && workerSilos.Active().Length == 0)
            {
                // Every worker silo is gone (a restart, a rollout): nothing is wrong with the run, it waits for one, however long.
                await Journal.AddEventNow("waiting-for-workers", $"no worker silo is active ({e.Message}); the run waits for one");
                var waited = Stopwatch.StartNew();
                await WaitForWorkerSilos(cancel);
                await Journal.AddEventNow("workers-back", $"{workerSilos.Active().Length} worker silo(s) active after {waited.Elapsed.TotalSeconds:F0} s; attaching again");
                failing.Reset();
                resumed = true;
            }
            catch (Exception e) when ((RunWorkers.IsTransient(e) || e is ShardMovedException) && !cancel.IsCancellationRequested && (failing.IsRunning || StartClock(failing)) && failing.Elapsed < RunWorkers.RetryBudget)
            {
                await Journal.AddEventNow("server-lost", $"parameter server shard call failed ({e.Message}); attaching again");
                await Task.Delay(TimeSpan.FromMilliseconds(200), cancel);
                resumed = true;
            }
        }
    }

    /// <summary>Polls this silo's view of the cluster (no call) with back-off up to 5 s until a worker silo is active.</summary>
    private async Task WaitForWorkerSilos(CancellationToken cancel)
    {
        for (int attempt = 0; workerSilos.Active().Length == 0; attempt++)
            await Task.Delay(TimeSpan.FromMilliseconds(Math.Min(5000, 200 << Math.Min(attempt, 5))), cancel);
    }

    private static bool StartClock(Stopwatch clock)
    {
        clock.Restart();
        return true;
    }

    /// <summary>
    /// What a coordinator trains against once attached: the run, its incarnation, the shards and the sizes of the training
    /// and test sets (taken once: a user's folder may have moved on since, and the silo keeps only its last versions).
    /// </summary>
    private sealed record Attachment(RunSpec Spec, int Incarnation, ParameterShards Shards, int TrainCount, int TestCount)
    {
        public BlockWork Window(int epoch, int step, int steps, long version, double lossBefore, string datasetSha256) =>
            new(Spec, Incarnation, epoch, step, version, Block: 0, BlockStarts: [], lossBefore, datasetSha256, Shards.Session, steps);
    }

    /// <summary>An epoch whose steps are all applied: its loss sum, the version it ended at, and its timings.</summary>
    private sealed record EpochEnd(int Epoch, double LossSum, long Version, Stopwatch Clock, double TrainSeconds, StepProfile? Profile);

    private async Task TrainFromServer(RunSpec spec, int incarnation, bool resumed, Stopwatch failing, CancellationToken cancel)
    {
        // The step and evaluation plans come from this silo's copy of the data: it must be the run's.
        var data = await datasets.Get(spec.Dataset, Record.DatasetSha256!);
        var shards = new ParameterShards(GrainFactory, RunId, spec, Record.CoordinatorKey);
        var position = await shards.Attach(incarnation);
        var run = new Attachment(spec, incarnation, shards, spec.TrainCount(data.Train.Count), data.Test.Count);
        // Cancelled when a step fails: its other calls stop retrying, and end, before the shards are attached again.
        using var stepCalls = CancellationTokenSource.CreateLinkedTokenSource(cancel);
        var resumeClock = Stopwatch.StartNew();
        _shardSilos = shards.Silos;
        long version = position.Step;
        var plan = new EpochPlan(run.TrainCount, spec.BatchSize, spec.ChunkSize, spec.Seed, 0);
        int steps = plan.Steps;
        int epoch = (int)Math.Min(spec.Epochs, version / steps), first = (int)(version - (long)epoch * steps);
        double lossSum = first > 0 ? position.EpochLossSum : 0;
        _step = version;
        var clock = Stopwatch.StartNew();
        if (resumed)
            await Journal.AddEventNow("resumed", $"continued from step {version} (epoch {epoch + 1}, step {first} of {steps}; last checkpoint at step {position.CheckpointStep}) on {SiloEndpoint}, coordinator incarnation {incarnation}");

        // Every epoch before this one must have its result: only the last one can be evaluated again (the parameters
        // are those it ended with); a run never completes with fewer epochs than it trained.
        int missing = epoch - (first == 0 && epoch > 0 ? 1 : 0) - Record.Epochs.Count;
        if (missing > 0)
            throw new MissingEpochsException($"run {RunId} is at epoch {epoch + 1} step {first} but only {Record.Epochs.Count} epoch results are stored: {missing} cannot be evaluated again");
        // Training of the epoch before ended, but its result was not stored: the parameters are those it ended with.
        if (first == 0 && epoch > 0 && Record.Epochs.Count == epoch - 1)
            await FinishEpoch(run, new EpochEnd(epoch - 1, position.EpochLossSum, version, clock, 0, null), cancel);

        var profile = new StepProfiler(SiloEndpoint);
        var windowProfile = new StepProfiler(SiloEndpoint);   // one window's, for the metrics
        for (int e = epoch; e < spec.Epochs; e++)
        {
            if (first == 0 && EarlyStopReason(spec) is { } reason)
            {
                if (!Record.Events.Any(ev => ev.Kind == "early-stop")) await Journal.AddEventNow("early-stop", reason);
                return;
            }
            if (plan.Epoch != e) plan.MoveTo(e);
            (_epoch, _stepInEpoch, _stepsPerEpoch) = (e, first, steps);
            profile.Reset();
            for (int s = first; s < steps;)
            {
                cancel.ThrowIfCancellationRequested();
                _stepInEpoch = s;
                var workers = await Workers.For(spec, incarnation);
                // One call per worker runs many steps while the workers stay well: the shards are the step barrier.
                // After a worker failed, one step a call, a failed block redone on the next worker.
                bool alone = Workers.OneStepAtATime;
                int count = alone ? 1 : StepWindow.Steps(_secondsPerStep, WindowTarget, MaxWindow, plan, s, version, spec.CheckpointEvery);
                long windowStart = Stopwatch.GetTimestamp(), allocatedAtStart = GC.GetTotalAllocatedBytes(precise: false);
                var window = await Workers.RunWindow(workers, run.Window(e, s, count, version, lossSum, Record.DatasetSha256!), plan.ChunkCount(s), stepCalls, retry: alone);
                double windowSeconds = Stopwatch.GetElapsedTime(windowStart).TotalSeconds;   // the steps only: not the checkpoint after them
                foreach (double stepLoss in window.StepLosses) lossSum += stepLoss;
                int applied = window.Applied;
                (version, s, _step, _stepInEpoch) = (version + applied, s + applied, version + applied, s + applied);
                if (applied > 0 && window.Failure is null)
                {
                    long ticks = Stopwatch.GetTimestamp() - windowStart;
                    profile.Add(window.Blocks!, Workers.RoundTrips, Workers.Replied, ticks, applied, allocatedAtStart);
                    windowProfile.Reset();
                    windowProfile.Add(window.Blocks!, Workers.RoundTrips, Workers.Replied, ticks, applied, allocatedAtStart);
                    BackpropMetrics.Window(applied, Samples(plan, s - applied, applied), windowSeconds, windowProfile.Result()!, window.Blocks!);
                }
                if (window.Divergence is { } divergence)
                {
                    // Shards whose slice was finite applied the step: all go back to the last good version.
                    await shards.MoveTo(incarnation, version);
                    throw new RunDivergedException(version + 1, e + 1, divergence);
                }
                // Every block is with every shard, but no worker saw the next version (a divergence reply lost with
                // its worker, then a redo that waited in vain): the shards' versions are not known to agree.
                if (applied == 0 && window.Failure is null) throw new ShardMovedException($"step {version} was not confirmed by any worker");
                if (applied > 0)
                {
                    failing.Reset();
                    if (version % spec.CheckpointEvery == 0) await shards.Checkpoint(incarnation, version);
                    if (resumed)
                    {
                        await Journal.AddEventNow("recovered", $"first step after the resume applied (step {version}), {resumeClock.ElapsedMilliseconds} ms after this coordinator attached");
                        resumed = false;
                    }
                }
                // A failed worker's siblings stopped at the step its block was missing from: go on from there.
                if (window.Failure is null) _secondsPerStep = windowSeconds / applied;
            }
            _stepInEpoch = steps;
            await FinishEpoch(run, new EpochEnd(e, lossSum, version, clock, clock.Elapsed.TotalSeconds, profile.Result()), cancel);
            (first, lossSum) = (0, 0);
            clock.Restart();
        }
    }

    /// <summary>
    /// Why the run stops before its next epoch (--early-stop): validation accuracy has not improved on its best (the
    /// earliest epoch with it) for the patience's number of epochs; null to go on. A function of the stored epochs only,
    /// so that a coordinator that takes over decides the same.
    /// </summary>
    private string? EarlyStopReason(RunSpec spec)
    {
        var epochs = Record.Epochs;
        if (spec.EarlyStop == 0 || epochs.Count == 0) return null;
        var bestEpoch = epochs.Aggregate((a, b) => b.ValidationAccuracy > a.ValidationAccuracy ? b : a);
        int since = epochs[^1].Epoch - bestEpoch.Epoch;
        return since >= spec.EarlyStop
            ? $"validation accuracy has not improved for {since} epochs (best {bestEpoch.ValidationAccuracy * 100:F2}% at epoch {bestEpoch.Epoch}): stopped after epoch {epochs[^1].Epoch} of {spec.Epochs}"
            : null;
    }

    /// <summary>Whether an epoch's validation accuracy beats every recorded epoch before it (the earliest wins a tie).</summary>
    private bool IsBest(EpochResult result) =>
        Record.Epochs.Where(e => e.Epoch < result.Epoch).All(e => result.ValidationAccuracy > e.ValidationAccuracy);

    private static long Samples(EpochPlan plan, int first, int count)
    {
        long samples = 0;
        for (int s = first; s < first + count; s++) samples += plan.StepSize(s);
        return samples;
    }

    /// <summary>Evaluates, checkpoints the shards at the epoch's end, then records the epoch (once: a resumed epoch is not added twice).</summary>
    private async Task FinishEpoch(Attachment run, EpochEnd end, CancellationToken cancel)
    {
        var (spec, epoch) = (run.Spec, end.Epoch);
        var workers = await Workers.For(spec, run.Incarnation);
        var work = new EvalWork(spec, run.Incarnation, end.Version, 0, 0, Record.DatasetSha256!, run.Shards.Session);
        var eval = await Workers.Evaluate(workers, work, run.TestCount, cancel);
        var validation = spec.Validation > 0 ? await Workers.Evaluate(workers, work with { Validation = true }, spec.Validation, cancel) : null;
        await run.Shards.Checkpoint(run.Incarnation, end.Version);
        // The whole vector comes to the coordinator once an epoch, for its hash.
        var parameters = await run.Shards.Gather(end.Version);
        var result = new EpochResult(epoch + 1, end.LossSum / run.TrainCount, eval.MeanLoss, eval.Accuracy, end.Clock.Elapsed.TotalSeconds,
            end.TrainSeconds > 0 ? run.TrainCount / end.TrainSeconds : 0, ParameterHash.Sha256(parameters.Parameters.Span), end.Version, eval.Confusion, end.Profile,
            validation?.MeanLoss, validation?.Accuracy);
        // Kept before the epoch is recorded: an epoch on record that is the best has its parameters kept.
        if (spec.KeepBest && (best.State.Parameters is null || best.State.Epoch <= epoch) && IsBest(result))
        {
            best.State = new BestParameters { Epoch = epoch + 1, Step = end.Version, Parameters = parameters.Parameters };
            await best.WriteStateAsync();
        }
        if (Record.Epochs.Count < epoch)
            throw new MissingEpochsException($"run {RunId}: epoch {epoch + 1} ended but only {Record.Epochs.Count} epoch results are stored before it");
        if (Record.Epochs.Count == epoch)
        {
            await Journal.Update(r => r.Epochs.Add(result));
            await Journal.Register(RunState.Running, spec, epoch + 1);
        }
        BackpropMetrics.EpochFinished(RunId, eval.Accuracy, eval.MeanLoss);
        logger.LogInformation("Run {Run} epoch {Epoch}: test accuracy {Accuracy:P2}, {Seconds:F1}s", RunId, epoch + 1, eval.Accuracy, result.Seconds);
    }
}

/// <summary>The record lacks results of epochs that are already trained: the run fails loudly rather than complete with fewer.</summary>
public sealed class MissingEpochsException(string message) : Exception(message);

/// <summary>A non-finite loss or gradient: the run stops as diverged, its last good checkpoint kept.</summary>
public sealed class RunDivergedException(long step, int epoch, string reason)
    : Exception($"diverged at step {step} (epoch {epoch}): {reason}");
