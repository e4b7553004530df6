using System.Diagnostics;
using Backprop.Core;
using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains;

/// <summary>
/// What a run's coordinator does while its loop runs: attach to the shards and settle on a version, run each epoch's
/// windows of steps through the workers (<see cref="RunWorkers"/>), checkpoint, evaluate and record each epoch, and
/// attach again after a lost shard or worker silo. <see cref="RunGrain"/> owns the loop's life (start, cancel, its
/// final state) and reads this class's progress for its status. One per coordinator activation.
/// </summary>
internal sealed class RunTraining(string runId, string siloEndpoint, DatasetCache datasets, IShardFactory shardFactory, IWorkerSilos workerSilos,
    RunJournal journal, RunWorkers runWorkers, IStoredState<BestParameters> best, ILogger logger)
{
    /// <summary>How long one call to the workers runs (a window of steps), about.</summary>
    private static readonly TimeSpan WindowTarget = TimeSpan.FromMilliseconds(200);
    private const int MaxWindow = 512;

    /// <summary>Measured over the last window: sizes the next one.</summary>
    private double _secondsPerStep;

    /// <summary>The epoch being trained (0-based), its step, and its step count.</summary>
    public int Epoch { get; private set; }
    public int StepInEpoch { get; private set; }
    public int StepsPerEpoch { get; private set; }
    /// <summary>Steps applied since the run's start (the shards' version).</summary>
    public long Step { get; private set; }
    /// <summary>The silo of each shard, as they said when last attached.</summary>
    public string[] ShardSilos { get; private set; } = [];

    private RunRecord Record => journal.Record;

    /// <summary>
    /// Trains from wherever the shards stand. When a shard's silo is lost, its next activation is at its last
    /// checkpoint: the coordinator attaches to all shards again and recomputes from the version they share.
    /// </summary>
    public async Task Train(RunSpec spec, int incarnation, bool resumed, CancellationToken cancel)
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
                await journal.AddEventNow("waiting-for-workers", $"no worker silo is active ({e.Message}); the run waits for one");
                var waited = Stopwatch.StartNew();
                await WaitForWorkerSilos(cancel);
                await journal.AddEventNow("workers-back", $"{workerSilos.Active().Length} worker silo(s) active after {waited.Elapsed.TotalSeconds:F0} s; attaching again");
                failing.Reset();
                resumed = true;
            }
            catch (Exception e) when ((RunWorkers.IsTransient(e) || e is ShardMovedException) && !cancel.IsCancellationRequested && (failing.IsRunning || StartClock(failing)) && failing.Elapsed < RunWorkers.RetryBudget)
            {
                await journal.AddEventNow("server-lost", $"parameter server shard call failed ({e.Message}); attaching again");
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
        var shards = new ParameterShards(shardFactory, runId, spec, Record.CoordinatorKey);
        var position = await shards.Attach(incarnation);
        var run = new Attachment(spec, incarnation, shards, spec.TrainCount(data.Train.Count), data.Test.Count);
        // Cancelled when a step fails: its other calls stop retrying, and end, before the shards are attached again.
        using var stepCalls = CancellationTokenSource.CreateLinkedTokenSource(cancel);
        var resumeClock = Stopwatch.StartNew();
        ShardSilos = shards.Silos;
        long version = position.Step;
        var plan = new EpochPlan(run.TrainCount, spec.BatchSize, spec.ChunkSize, spec.Seed, 0);
        int steps = plan.Steps;
        int epoch = (int)Math.Min(spec.Epochs, version / steps), first = (int)(version - (long)epoch * steps);
        double lossSum = first > 0 ? position.EpochLossSum : 0;
        Step = version;
        var clock = Stopwatch.StartNew();
        if (resumed)
            await journal.AddEventNow("resumed", $"continued from step {version} (epoch {epoch + 1}, step {first} of {steps}; last checkpoint at step {position.CheckpointStep}) on {siloEndpoint}, coordinator incarnation {incarnation}");

        // Every epoch before this one must have its result: only the last one can be evaluated again (the parameters
        // are those it ended with); a run never completes with fewer epochs than it trained.
        int missing = epoch - (first == 0 && epoch > 0 ? 1 : 0) - Record.Epochs.Count;
        if (missing > 0)
            throw new MissingEpochsException($"run {runId} is at epoch {epoch + 1} step {first} but only {Record.Epochs.Count} epoch results are stored: {missing} cannot be evaluated again");
        // Training of the epoch before ended, but its result was not stored: the parameters are those it ended with.
        if (first == 0 && epoch > 0 && Record.Epochs.Count == epoch - 1)
            await FinishEpoch(run, new EpochEnd(epoch - 1, position.EpochLossSum, version, clock, 0, null), cancel);

        var profile = new StepProfiler(siloEndpoint);
        var windowProfile = new StepProfiler(siloEndpoint);   // one window's, for the metrics
        for (int e = epoch; e < spec.Epochs; e++)
        {
            if (first == 0 && EarlyStopReason(spec) is { } reason)
            {
                if (!Record.Events.Any(ev => ev.Kind == "early-stop")) await journal.AddEventNow("early-stop", reason);
                return;
            }
            if (plan.Epoch != e) plan.MoveTo(e);
            (Epoch, StepInEpoch, StepsPerEpoch) = (e, first, steps);
            profile.Reset();
            for (int s = first; s < steps;)
            {
                cancel.ThrowIfCancellationRequested();
                StepInEpoch = s;
                var workers = await runWorkers.For(spec, incarnation);
                // One call per worker runs many steps while the workers stay well: the shards are the step barrier.
                // After a worker failed, one step a call, a failed block redone on the next worker.
                bool alone = runWorkers.OneStepAtATime;
                int count = alone ? 1 : StepWindow.Steps(_secondsPerStep, WindowTarget, MaxWindow, plan, s, version, spec.CheckpointEvery);
                long windowStart = Stopwatch.GetTimestamp(), allocatedAtStart = GC.GetTotalAllocatedBytes(precise: false);
                var window = await runWorkers.RunWindow(workers, run.Window(e, s, count, version, lossSum, Record.DatasetSha256!), plan.ChunkCount(s), stepCalls, retry: alone);
                double windowSeconds = Stopwatch.GetElapsedTime(windowStart).TotalSeconds;   // the steps only: not the checkpoint after them
                foreach (double stepLoss in window.StepLosses) lossSum += stepLoss;
                int applied = window.Applied;
                (version, s, Step, StepInEpoch) = (version + applied, s + applied, version + applied, s + applied);
                if (applied > 0 && window.Failure is null)
                {
                    long ticks = Stopwatch.GetTimestamp() - windowStart;
                    profile.Add(window.Blocks!, runWorkers.RoundTrips, runWorkers.Replied, ticks, applied, allocatedAtStart);
                    windowProfile.Reset();
                    windowProfile.Add(window.Blocks!, runWorkers.RoundTrips, runWorkers.Replied, ticks, applied, allocatedAtStart);
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
                        await journal.AddEventNow("recovered", $"first step after the resume applied (step {version}), {resumeClock.ElapsedMilliseconds} ms after this coordinator attached");
                        resumed = false;
                    }
                }
                // A failed worker's siblings stopped at the step its block was missing from: go on from there.
                if (window.Failure is null) _secondsPerStep = windowSeconds / applied;
            }
            StepInEpoch = steps;
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
        var workers = await runWorkers.For(spec, run.Incarnation);
        var work = new EvalWork(spec, run.Incarnation, end.Version, 0, 0, Record.DatasetSha256!, run.Shards.Session);
        var eval = await runWorkers.Evaluate(workers, work, run.TestCount, cancel);
        var validation = spec.Validation > 0 ? await runWorkers.Evaluate(workers, work with { Validation = true }, spec.Validation, cancel) : null;
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
            await best.Write();
        }
        if (Record.Epochs.Count < epoch)
            throw new MissingEpochsException($"run {runId}: epoch {epoch + 1} ended but only {Record.Epochs.Count} epoch results are stored before it");
        if (Record.Epochs.Count == epoch)
        {
            await journal.Update(r => r.Epochs.Add(result));
            await journal.Register(RunState.Running, spec, epoch + 1);
        }
        BackpropMetrics.EpochFinished(runId, eval.Accuracy, eval.MeanLoss);
        logger.LogInformation("Run {Run} epoch {Epoch}: test accuracy {Accuracy:P2}, {Seconds:F1}s", runId, epoch + 1, eval.Accuracy, result.Seconds);
    }
}


/// <summary>The record lacks results of epochs that are already trained: the run fails loudly rather than complete with fewer.</summary>
public sealed class MissingEpochsException(string message) : Exception(message);

/// <summary>A non-finite loss or gradient: the run stops as diverged, its last good checkpoint kept.</summary>
public sealed class RunDivergedException(long step, int epoch, string reason)
    : Exception($"diverged at step {step} (epoch {epoch}): {reason}");
