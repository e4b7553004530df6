using Backprop.Core;
using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains;

/// <summary>
/// The coordinator of one run: a thin grain over its record (<see cref="RunJournal"/>), its workers
/// (<see cref="RunWorkers"/>: windows of steps, evaluations, redos), its parameter-server shards
/// (<see cref="ParameterShards"/>) and its epoch loop (<see cref="RunTraining"/>); the grain owns the loop's life (start,
/// cancel, resume, the state it ends in) and answers for the run. The loop is background work on this activation (not
/// a grain call), so status and cancel calls are answered while it runs. Each window (<see cref="StepWindow"/>): the workers get the
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

    private RunJournal? _journal;
    private RunWorkers? _runWorkers;
    private Task? _loop;
    private CancellationTokenSource _cancel = new();
    private CancellationTokenSource _stop = new();
    private TaskCompletionSource _finished = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private RunTraining? _training;
    private CoordinatorGrainPorts? _ports;

    // The only place the coordinator's classes meet Orleans: they see its grains and storage through these ports.
    private CoordinatorGrainPorts Ports => _ports ??= new CoordinatorGrainPorts(GrainFactory);
    private RunJournal Journal => _journal ??= new RunJournal(new GrainStoredState<RunRecord>(record), RunId, Ports, logger, DeactivateOnIdle);
    private RunWorkers Workers => _runWorkers ??= new RunWorkers(RunId, Ports, workerSilos, Journal, logger);
    private RunTraining Training => _training ??= new RunTraining(RunId, SiloEndpoint, datasets, Ports, workerSilos, Journal, Workers,
        new GrainStoredState<BestParameters>(best), logger);
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
        var current = await new ParameterShards(Ports, RunId, spec).Gather(step: null);
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
        await new ParameterShards(Ports, RunId, spec).Forget();
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
        return new RunStatus(RunId, r.State, r.Spec, Training.Epoch, Training.StepInEpoch, Training.StepsPerEpoch, epochs, r.Error,
            Workers.Silos, SiloEndpoint, Training.ShardSilos, Training.Step > 0 || r.Epochs.Count == 0 ? Training.Step : r.Epochs[^1].Steps, r.Events.ToArray(), r.Epochs.Count, Workers.Stats);
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
            await Training.Train(spec, Record.Incarnation, resumed, either.Token);
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
            if (final == RunState.Cancelled && Training.Step > 0)   // keep the progress, so that `resume` continues from here
                await new ParameterShards(Ports, RunId, spec, Record.CoordinatorKey).Checkpoint(Record.Incarnation, Training.Step);
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
            await new ParameterShards(Ports, RunId, spec).Retire();
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
}
