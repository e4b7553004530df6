using System.Diagnostics;
using Backprop.Core;
using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains;

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

    public RunRecord Copy() => new()
    {
        Spec = Spec, State = State, Epochs = [.. Epochs], Error = Error, Incarnation = Incarnation, Events = [.. Events], DatasetSha256 = DatasetSha256,
    };
}

/// <summary>
/// The coordinator of one run. Its training loop is background work on this activation (not a grain
/// call), so status and cancel calls are answered while it runs. Each sync step: cut the step's chunks into
/// aligned blocks of the reduction tree (<see cref="ChunkBlocks"/>, block b to worker b) and send each worker its
/// block's numbers and the version to compute on; the workers push their sums to the parameter-server shards and
/// get the next version back themselves, so this grain never carries a vector. When this grain's silo dies, the
/// next activation (started by a silo's <see cref="RunWatchdog"/> or any call) settles the shards on the latest
/// version they all hold and goes on: the data order is a function of (seed, epoch) and every step of the
/// parameters and step number, so the bits are the same.
/// </summary>
public sealed class RunGrain(
    DatasetCache datasets,
    WorkerSettings settings,
    ILocalSiloDetails silo,
    WorkerSilos workerSilos,
    [PersistentState(StoredRuns.StateName, SiloSetup.StorageName)] IPersistentState<RunRecord> record,
    ILogger<RunGrain> logger) : Grain, IRunGrain
{
    /// <summary>How long one piece of work is retried on other workers: longer than failure detection takes.</summary>
    private static readonly TimeSpan RetryBudget = TimeSpan.FromSeconds(30);
    private static readonly TimeSpan MaxWait = TimeSpan.FromSeconds(10);
    private const int MaxEvents = 200;

    private readonly SemaphoreSlim _writes = new(1, 1);
    /// <summary>
    /// A newer coordinator owns the run: this activation never runs a loop or writes the record again, and goes
    /// away after the current call (the next one activates the grain afresh, from the stored record).
    /// </summary>
    private bool _fenced;
    private Task? _loop;
    private CancellationTokenSource _cancel = new();
    private CancellationTokenSource _stop = new();
    private TaskCompletionSource _finished = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _epoch;
    private int _stepInEpoch;
    private int _stepsPerEpoch;
    private long _step;
    private string[] _shardSilos = [];
    private readonly SortedSet<string> _workerSilos = new(StringComparer.Ordinal);
    private IWorkerGrain[] _workers = [];
    private string[] _spreadOver = [];
    private int _generation;
    private int _workersIncarnation;
    // One step's calls and replies, reused from step to step.
    private Task<BlockDone>[] _calls = [];
    private BlockDone[] _blocks = [];
    private long[] _roundTrips = [], _replied = [];
    // The cut of a full step and of a short last one, for the current worker count.
    private (ChunkBlocks Cut, int[] Starts) _cut, _shortCut;
    private int _cutWorkers;
    private StepProfiler? _profile;

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
        if (record.State.State == RunState.Running && settings.KeepRunsGoing && !LoopActive && !_fenced) StartLoop(resumed: true);
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
        ThrowIfFenced();
        if (record.State.Spec is { } existing)
        {
            if (existing != spec) throw new ArgumentException($"run id '{RunId}' is already used by another run");
            if (record.State.State != RunState.NotStarted) return Status(0);
        }
        spec.Validate();
        var data = await datasets.Get(spec.Dataset);
        spec.ValidateAgainst(data.Train);
        string sha = await datasets.Sha256(spec.Dataset);

        // Stored before it is registered (the registry lists only stored runs), but as running only once registered:
        // a run the registry does not know would not be continued after its silo dies.
        await Update(r => { r.Spec = spec; r.DatasetSha256 = sha; });
        await Register(RunState.Running, spec, 0, required: true);
        await Update(r =>
        {
            r.State = RunState.Running;
            AddEvent(r, "started", $"{spec.Model.Describe()}, batch {spec.BatchSize}, chunk {spec.ChunkSize}, {spec.Workers} workers, {spec.Epochs} epochs, data sha256 {sha[..12]}");
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
        else if (record.State.State == RunState.Running) await Task.Delay(wait);
        return Status(knownEpochs);
    }

    public async Task<RunStatus> Cancel()
    {
        ThrowIfFenced();
        if (LoopActive)
        {
            _cancel.Cancel();
        }
        else if (record.State.State == RunState.Running)
        {
            // Stored as running but no loop here (an interrupted embedded run): stop it for good.
            await Update(r => { r.State = RunState.Cancelled; AddEvent(r, "cancelled", "cancelled while no coordinator was running it"); });
            await Register(RunState.Cancelled, record.State.Spec!, record.State.Epochs.Count);
        }
        return Status(0);
    }

    public async Task<RunStatus> Resume()
    {
        var spec = record.State.Spec ?? throw new ArgumentException($"no run '{RunId}'");
        ThrowIfFenced();
        if (LoopActive) return Status(0);
        if (record.State.State is RunState.Completed or RunState.Diverged) return Status(0);   // nothing to continue
        await Register(RunState.Running, spec, record.State.Epochs.Count, required: true);
        await Update(r => { r.State = RunState.Running; r.Error = null; AddEvent(r, "resume", $"resume requested (was {record.State.State.ToString().ToLowerInvariant()})"); });
        StartLoop(resumed: true);
        return Status(0);
    }

    public async Task<TrainedModel> GetModel()
    {
        var spec = record.State.Spec ?? throw new ArgumentException($"no run '{RunId}'");
        var current = await new ParameterShards(GrainFactory, RunId, spec).Gather(step: null);
        return new TrainedModel(spec, current.Parameters, current.Step);
    }

    private RunStatus Status(int knownEpochs)
    {
        var r = record.State;
        var epochs = r.Epochs.Skip(Math.Max(0, knownEpochs)).ToArray();
        return new RunStatus(RunId, r.State, r.Spec, _epoch, _stepInEpoch, _stepsPerEpoch, epochs, r.Error,
            _workerSilos.ToArray(), SiloEndpoint, _shardSilos, _step > 0 || r.Epochs.Count == 0 ? _step : r.Epochs[^1].Steps, r.Events.ToArray(), r.Epochs.Count);
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
        var spec = record.State.Spec!;
        using var either = CancellationTokenSource.CreateLinkedTokenSource(cancel, stop);
        RunState final;
        string? error = null;
        try
        {
            // This loop's incarnation, stored before it acts: a coordinator still running elsewhere is fenced off.
            await Update(r => r.Incarnation++, claim: true);
            await Train(spec, record.State.Incarnation, resumed, either.Token);
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
            Fence();
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
        if (_fenced)
        {
            // Fenced while ending (a write on the way out met the newer owner): nothing more is this activation's to store.
            EndLoop();
            return;
        }
        logger.LogInformation("Run {Run} {State}", RunId, final);
        try
        {
            if (final == RunState.Cancelled && _step > 0)   // keep the progress, so that `resume` continues from here
                await new ParameterShards(GrainFactory, RunId, spec).Checkpoint(record.State.Incarnation, _step);
        }
        catch (Exception e)
        {
            logger.LogWarning("Run {Run}: checkpoint at cancel failed ({Error})", RunId, e.Message);
        }
        try
        {
            await Update(r =>
            {
                r.State = final;
                r.Error = error;
                AddEvent(r, final.ToString().ToLowerInvariant(), error ?? $"after {r.Epochs.Count} epochs");
            });
            await Register(final, spec, record.State.Epochs.Count);
        }
        catch (Exception e)
        {
            // Still stored as running: the next status call or watchdog sweep starts a loop that finds the end again.
            logger.LogError(e, "Run {Run}: could not store its final state", RunId);
        }
        EndLoop();
    }

    private void EndLoop()
    {
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
            catch (Exception e) when ((IsTransient(e) || e is ShardMovedException) && !cancel.IsCancellationRequested && workerSilos.Active().Length == 0)
            {
                // Every worker silo is gone (a restart, a rollout): nothing is wrong with the run, it waits for one, however long.
                await AddEventNow("waiting-for-workers", $"no worker silo is active ({e.Message}); the run waits for one");
                var waited = Stopwatch.StartNew();
                await WaitForWorkerSilos(cancel);
                await AddEventNow("workers-back", $"{workerSilos.Active().Length} worker silo(s) active after {waited.Elapsed.TotalSeconds:F0} s; attaching again");
                failing.Reset();
                resumed = true;
            }
            catch (Exception e) when ((IsTransient(e) || e is ShardMovedException) && !cancel.IsCancellationRequested && (failing.IsRunning || StartClock(failing)) && failing.Elapsed < RetryBudget)
            {
                await AddEventNow("server-lost", $"parameter server shard call failed ({e.Message}); attaching again");
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

    private async Task TrainFromServer(RunSpec spec, int incarnation, bool resumed, Stopwatch failing, CancellationToken cancel)
    {
        // The step and evaluation plans come from this silo's copy of the data: it must be the run's.
        if (await datasets.Sha256(spec.Dataset) != record.State.DatasetSha256)
            throw new DataMismatchException($"silo {SiloEndpoint}: its data set '{spec.Dataset}' differs from the run's; check {datasets.DataDir}");
        var data = await datasets.Get(spec.Dataset);
        int trainCount = spec.TrainCount(data.Train.Count);
        var shards = new ParameterShards(GrainFactory, RunId, spec);
        var position = await shards.Attach(incarnation);
        // Cancelled when a step fails: its other calls stop retrying, and end, before the shards are attached again.
        using var stepCalls = CancellationTokenSource.CreateLinkedTokenSource(cancel);
        var resumeClock = Stopwatch.StartNew();
        _shardSilos = shards.Silos;
        long version = position.Step;
        var plan = new EpochPlan(trainCount, spec.BatchSize, spec.ChunkSize, spec.Seed, 0);
        int steps = plan.Steps;
        int epoch = (int)Math.Min(spec.Epochs, version / steps), first = (int)(version - (long)epoch * steps);
        double lossSum = first > 0 ? position.EpochLossSum : 0;
        _step = version;
        var clock = Stopwatch.StartNew();
        if (resumed)
            await AddEventNow("resumed", $"continued from step {version} (epoch {epoch + 1}, step {first} of {steps}; last checkpoint at step {position.CheckpointStep}) on {SiloEndpoint}, coordinator incarnation {incarnation}");

        // Every epoch before this one must have its result: only the last one can be evaluated again (the parameters
        // are those it ended with); a run never completes with fewer epochs than it trained.
        int missing = epoch - (first == 0 && epoch > 0 ? 1 : 0) - record.State.Epochs.Count;
        if (missing > 0)
            throw new MissingEpochsException($"run {RunId} is at epoch {epoch + 1} step {first} but only {record.State.Epochs.Count} epoch results are stored: {missing} cannot be evaluated again");
        // Training of the epoch before ended, but its result was not stored: the parameters are those it ended with.
        if (first == 0 && epoch > 0 && record.State.Epochs.Count == epoch - 1)
            await FinishEpoch(spec, epoch - 1, position.EpochLossSum, trainCount, version, shards, await Workers(spec, incarnation), clock, 0, incarnation, cancel, null);

        var profile = _profile = new StepProfiler(SiloEndpoint);
        for (int e = epoch; e < spec.Epochs; e++)
        {
            if (plan.Epoch != e) plan.MoveTo(e);
            (_epoch, _stepInEpoch, _stepsPerEpoch) = (e, first, steps);
            profile.Reset();
            for (int s = first; s < steps; s++)
            {
                cancel.ThrowIfCancellationRequested();
                _stepInEpoch = s;
                long stepStart = Stopwatch.GetTimestamp();
                var blocks = await ComputeStep(await Workers(spec, incarnation), spec, incarnation, shards.Session, e, s, plan.ChunkCount(s), version, lossSum, stepCalls);
                double stepLoss = 0;
                string? divergence = null;
                bool applied = false;
                foreach (var block in blocks)
                    (stepLoss, divergence, applied) = (stepLoss + block.LossSum, divergence ?? block.Divergence, applied || block.Applied);
                if (divergence is not null)
                {
                    // Shards whose slice was finite applied the step: all go back to the last good version.
                    await shards.MoveTo(incarnation, version);
                    throw new RunDivergedException(version + 1, e + 1, divergence);
                }
                // Every block is with every shard, but no worker saw the next version (a divergence reply lost with
                // its worker, then a redo that waited in vain): the shards' versions are not known to agree.
                if (!applied) throw new ShardMovedException($"step {version} was not confirmed by any worker");
                lossSum += stepLoss;
                version++;
                profile.Add(blocks, _roundTrips, _replied, Stopwatch.GetTimestamp() - stepStart);
                _step = version;
                failing.Reset();
                if (version % spec.CheckpointEvery == 0) await shards.Checkpoint(incarnation, version);
                if (resumed)
                {
                    await AddEventNow("recovered", $"first step after the resume applied (step {version}), {resumeClock.ElapsedMilliseconds} ms after this coordinator attached");
                    resumed = false;
                }
            }
            double trainSeconds = clock.Elapsed.TotalSeconds;
            _stepInEpoch = steps;
            await FinishEpoch(spec, e, lossSum, trainCount, version, shards, await Workers(spec, incarnation), clock, trainSeconds, incarnation, cancel, profile.Result());
            (first, lossSum) = (0, 0);
            clock.Restart();
        }
    }

    /// <summary>
    /// The workers for the next step, spread over the worker silos active now. Worker activations never move, so
    /// when the set of worker silos changes (one joined, left or died) the run takes a new generation of workers,
    /// keyed "{runId}/{incarnation}.{generation}/{i}", which placement spreads over the current silos; the old ones
    /// idle until collected. The count is the spec's, or one per worker silo where there are more silos: a silo
    /// that joins gets work from the next step on. Which worker computes a chunk never changes a bit (chunk sums
    /// are added in chunk order). Checked before every step: it reads this silo's membership and manifest, no call.
    /// </summary>
    private ValueTask<IWorkerGrain[]> Workers(RunSpec spec, int incarnation)
    {
        var silos = workerSilos.Active();
        // A re-attach of the same coordinator keeps its workers; a new incarnation takes its own.
        if (_workers.Length > 0 && _workersIncarnation == incarnation && (silos.Length == 0 || silos == _spreadOver || silos.SequenceEqual(_spreadOver)))
            return ValueTask.FromResult(_workers);
        return new ValueTask<IWorkerGrain[]>(NewWorkers(spec, incarnation, silos));
    }

    private async Task<IWorkerGrain[]> NewWorkers(RunSpec spec, int incarnation, string[] silos)
    {
        (_spreadOver, _workersIncarnation) = (silos, incarnation);
        int count = Math.Clamp(Math.Max(spec.Workers, silos.Length), 1, RunSpec.MaxWorkers), generation = _generation++;
        _workers = Enumerable.Range(0, count).Select(i => GrainFactory.GetGrain<IWorkerGrain>($"{RunId}/{incarnation}.{generation}/{i}")).ToArray();
        await AddEventNow("workers", $"{count} workers over {silos.Length} worker silos ({string.Join(", ", silos)}), generation {generation}");
        return _workers;
    }

    /// <summary>Evaluates, checkpoints the shards at the epoch's end, then records the epoch (once: a resumed epoch is not added twice).</summary>
    private async Task FinishEpoch(RunSpec spec, int epoch, double lossSum, int trainCount, long version,
        ParameterShards shards, IWorkerGrain[] workers, Stopwatch clock, double trainSeconds, int incarnation, CancellationToken cancel, StepProfile? profile)
    {
        var test = (await datasets.Get(spec.Dataset)).Test;
        var eval = await Evaluate(workers, spec, incarnation, shards.Session, test.Count, version, cancel);
        await shards.Checkpoint(incarnation, version);
        // The whole vector comes to the coordinator once an epoch, for its hash.
        var parameters = await shards.Gather(version);
        var result = new EpochResult(epoch + 1, lossSum / trainCount, eval.MeanLoss, eval.Accuracy, clock.Elapsed.TotalSeconds,
            trainSeconds > 0 ? trainCount / trainSeconds : 0, ParameterHash.Sha256(parameters.Parameters.Span), version, eval.Confusion, profile);
        if (record.State.Epochs.Count < epoch)
            throw new MissingEpochsException($"run {RunId}: epoch {epoch + 1} ended but only {record.State.Epochs.Count} epoch results are stored before it");
        if (record.State.Epochs.Count == epoch)
        {
            await Update(r => r.Epochs.Add(result));
            await Register(RunState.Running, spec, epoch + 1);
        }
        logger.LogInformation("Run {Run} epoch {Epoch}: test accuracy {Accuracy:P2}, {Seconds:F1}s", RunId, epoch + 1, eval.Accuracy, result.Seconds);
    }

    /// <summary>
    /// The blocks of one step, in block order: block b on worker b, redone by the next worker while it fails. Each
    /// worker pushes its sum to the shards itself; once every block is back, every shard has applied the step.
    /// Each call's round trip and reply time go to <see cref="_roundTrips"/> and <see cref="_replied"/> for the profile.
    /// </summary>
    private async Task<BlockDone[]> ComputeStep(IWorkerGrain[] workers, RunSpec spec, int incarnation, long session, int epoch, int step, int chunkCount,
        long version, double lossBefore, CancellationTokenSource calls)
    {
        var cancel = calls.Token;
        var (blocks, starts) = BlocksFor(chunkCount, workers.Length);
        int count = blocks.Count;
        if (_calls.Length != count)
            (_calls, _blocks, _roundTrips, _replied) = (new Task<BlockDone>[count], new BlockDone[count], new long[count], new long[count]);
        for (int b = 0; b < count; b++)
        {
            _calls[b] = ComputeBlock(workers, b, new BlockWork(spec, incarnation, epoch, step, version, b, starts, lossBefore, record.State.DatasetSha256!, session), cancel);
            // The first failure, whichever block's, stops the others' retries at once.
            _ = _calls[b].ContinueWith(static (_, source) => ((CancellationTokenSource)source!).Cancel(), calls, CancellationToken.None,
                TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        }
        try
        {
            try
            {
                await Task.WhenAll(_calls);
            }
            catch (Exception)
            {
                // Every call has ended (none is left running when the caller attaches again); the most telling failure counts.
                throw _calls.Where(c => c.IsFaulted).Select(c => c.Exception!.InnerException!).OrderBy(Severity).First();
            }
            for (int b = 0; b < count; b++)
            {
                var reply = _calls[b].Result;
                if (reply.FirstChunk != blocks.First(b))
                    throw new InvalidOperationException($"step {step}: block {b} came back for chunk {reply.FirstChunk}, not {blocks.First(b)}");
                _blocks[b] = reply;
            }
        }
        finally
        {
            Array.Clear(_calls);
        }
        return _blocks;
    }

    /// <summary>Which of a step's failures decides what the loop does: a newer owner, divergence, bad input, a moved shard, then the rest.</summary>
    private static int Severity(Exception e) => e switch
    {
        StaleCoordinatorException => 0,
        RunDivergedException => 1,
        ArgumentException or MissingEpochsException => 2,
        ShardMovedException => 3,
        OperationCanceledException => 5,
        _ => 4,
    };

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

    /// <summary>Block <see cref="BlockWork.Block"/> on worker b, then on the next workers while it fails.</summary>
    private async Task<BlockDone> ComputeBlock(IWorkerGrain[] workers, int b, BlockWork work, CancellationToken cancel)
    {
        long start = Stopwatch.GetTimestamp();
        var reply = await WithRetry(workers, b, new WorkLabel(work.Step, work.FirstChunk, -1), work, static (worker, work) => worker.ComputeBlock(work), cancel);
        long end = Stopwatch.GetTimestamp();
        (_roundTrips[b], _replied[b]) = (end - start, end);
        _workerSilos.Add(reply.Silo);
        return reply;
    }

    /// <summary>What a retried call computes, formatted only for the event log.</summary>
    private readonly record struct WorkLabel(int Step, int First, int End)
    {
        public override string ToString() => Step < 0 ? $"evaluation of test samples [{First}, {End})" : $"step {Step} block from chunk {First}";
    }

    /// <summary>Test samples per evaluation call; fixed, so that the loss sum is added in the same blocks whatever the worker count.</summary>
    private const int EvalBlock = 1024;

    /// <summary>
    /// The test set cut into blocks of <see cref="EvalBlock"/> samples, block b to worker b mod W, the partial
    /// results added in block order: counts add up exactly, and the loss (a double sum) does not depend on how
    /// many workers there are. A failed block is redone by another worker.
    /// </summary>
    private async Task<Evaluation> Evaluate(IWorkerGrain[] workers, RunSpec spec, int incarnation, long session, int testCount, long version, CancellationToken cancel)
    {
        int blocks = (testCount + EvalBlock - 1) / EvalBlock;
        var calls = Enumerable.Range(0, blocks).Select(b =>
        {
            int start = b * EvalBlock, end = Math.Min(testCount, start + EvalBlock);
            var work = new EvalWork(spec, incarnation, version, start, end, record.State.DatasetSha256!, session);
            return WithRetry(workers, b % workers.Length, new WorkLabel(-1, start, end), work, static (worker, work) => worker.Evaluate(work), cancel);
        });
        var partials = await Task.WhenAll(calls);
        return partials.Aggregate((a, b) => a.Add(b));
    }

    /// <summary>
    /// Runs <paramref name="call"/> on worker <paramref name="first"/>, and on the next workers in turn while it fails,
    /// for up to <see cref="RetryBudget"/>. Bad input (ArgumentException) is never retried.
    /// </summary>
    private async Task<T> WithRetry<TWork, T>(IWorkerGrain[] workers, int first, WorkLabel what, TWork work, Func<IWorkerGrain, TWork, Task<T>> call, CancellationToken cancel)
    {
        var failing = new Stopwatch();
        for (int attempt = 0; ; attempt++)
        {
            int index = (first + attempt) % workers.Length;
            try
            {
                var result = await call(workers[index], work);
                if (attempt > 0) await AddEventNow("redone", $"{what} redone on worker {index}, {failing.Elapsed.TotalSeconds:F1} s after the first failure");
                return result;
            }
            catch (Exception e) when (IsTransient(e) && !cancel.IsCancellationRequested && (failing.IsRunning || StartClock(failing)) && failing.Elapsed < RetryBudget)
            {
                logger.LogWarning("Run {Run}: {What} failed on worker {Worker} ({Error}); retrying on the next worker", RunId, what, index, e.Message);
                await AddEventNow("worker-failed", $"{what} failed on worker {index}: {e.Message}");
                await Task.Delay(TimeSpan.FromMilliseconds(Math.Min(1000, 100 * (attempt + 1))), cancel);
            }
        }
    }

    private static bool IsTransient(Exception e) =>
        e is not (ArgumentException or StaleCoordinatorException or RunDivergedException or OperationCanceledException or ShardMovedException
            or MissingEpochsException);

    private async Task Register(RunState state, RunSpec spec, int epochsDone, bool required = false)
    {
        try
        {
            double? accuracy = record.State.Epochs.Count > 0 ? record.State.Epochs[^1].TestAccuracy : null;
            await GrainFactory.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key)
                .Update(new RunSummary(RunId, state, epochsDone, spec.Epochs, accuracy, DateTime.UtcNow));
        }
        catch (Exception e) when (!required)
        {
            // Later updates are for display; the first (at start or resume) is what the watchdog's sweep relies on.
            logger.LogWarning("Run {Run}: could not update the run list ({Error})", RunId, e.Message);
        }
    }

    /// <summary>Stores an event now; a failed write costs the event, never the run.</summary>
    private async Task AddEventNow(string kind, string message)
    {
        try
        {
            await Update(r => AddEvent(r, kind, message));
        }
        catch (Exception e) when (e is not StaleCoordinatorException)
        {
            logger.LogWarning("Run {Run}: could not store event {Kind} ({Error}): {Message}", RunId, kind, e.Message, message);
        }
    }

    private static void AddEvent(RunRecord r, string kind, string message)
    {
        r.Events.Add(new RunEvent(DateTime.UtcNow, kind, message));
        if (r.Events.Count > MaxEvents) r.Events.RemoveRange(1, r.Events.Count - MaxEvents);   // the first ("started") stays
    }

    /// <summary>
    /// Changes the record in memory only once the change is stored (a failed write leaves the run as it was).
    /// <paramref name="claim"/>: this write takes the run over (a new incarnation).
    /// </summary>
    private async Task Update(Action<RunRecord> change, bool claim = false)
    {
        await _writes.WaitAsync();
        var before = record.State;
        try
        {
            // After a conflict the state holds the stored ETag: a write from here would overwrite the newer owner's record.
            if (_fenced) throw new StaleCoordinatorException($"run {RunId}: this coordinator was fenced off by a newer one");
            var next = before.Copy();
            change(next);
            record.State = next;
            // Fenced: a record written by a newer coordinator is not overwritten (nor an equal one, when claiming).
            await record.WriteAuthoritative((stored, mine) => claim ? stored.Incarnation >= mine.Incarnation : stored.Incarnation > mine.Incarnation);
        }
        catch (StaleCoordinatorException)
        {
            record.State = before;
            Fence();
            throw;
        }
        catch
        {
            record.State = before;
            throw;
        }
        finally
        {
            _writes.Release();
        }
    }

    /// <summary>This activation's record is older than the stored one: the caller asks again and reaches a fresh activation.</summary>
    private void ThrowIfFenced()
    {
        if (_fenced) throw new StaleCoordinatorException($"run {RunId}: this activation was replaced by a newer coordinator; ask again");
    }

    private void Fence()
    {
        _fenced = true;
        DeactivateOnIdle();
    }
}

/// <summary>The record lacks results of epochs that are already trained: the run fails loudly rather than complete with fewer.</summary>
public sealed class MissingEpochsException(string message) : Exception(message);

/// <summary>A non-finite loss or gradient: the run stops as diverged, its last good checkpoint kept.</summary>
public sealed class RunDivergedException(long step, int epoch, string reason)
    : Exception($"diverged at step {step} (epoch {epoch}): {reason}");
