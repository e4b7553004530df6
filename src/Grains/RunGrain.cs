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
}

/// <summary>
/// The coordinator of one run. Its training loop is background work on this activation (not a grain
/// call), so status and cancel calls are answered while it runs. Each sync step: fetch the current
/// parameters, send chunk numbers to workers (chunk c to worker c mod W), collect the chunk sums, and
/// hand them to the parameter server in chunk order.
/// </summary>
public sealed class RunGrain(
    DatasetCache datasets,
    [PersistentState("run", SiloSetup.StorageName)] IPersistentState<RunRecord> record,
    ILogger<RunGrain> logger) : Grain, IRunGrain
{
    private const int MaxAttemptsPerStep = 3;
    private static readonly TimeSpan MaxWait = TimeSpan.FromSeconds(10);

    private CancellationTokenSource? _cancel;
    private readonly TaskCompletionSource _finished = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _epoch;
    private int _stepInEpoch;
    private int _stepsPerEpoch;
    private readonly SortedSet<string> _workerSilos = new(StringComparer.Ordinal);

    private string RunId => this.GetPrimaryKeyString();

    public override async Task OnActivateAsync(CancellationToken cancellationToken)
    {
        // A run marked running whose coordinator is gone (its silo died) cannot continue yet: say so.
        if (record.State.State == RunState.Running)
        {
            record.State.State = RunState.Failed;
            record.State.Error = "the run's coordinator was lost (its silo stopped) before the run finished";
            await record.WriteAuthoritative();
        }
    }

    public async Task<RunStatus> Start(RunSpec spec)
    {
        if (record.State.Spec is { } existing)
        {
            if (existing != spec) throw new ArgumentException($"run id '{RunId}' is already used by another run");
            return Status();
        }
        spec.Validate();
        var data = await datasets.Get(spec.Dataset);
        spec.ValidateAgainst(data.Train);

        record.State.Spec = spec;
        record.State.State = RunState.Running;
        await record.WriteAuthoritative();
        _cancel = new CancellationTokenSource();
        DelayDeactivation(TimeSpan.FromDays(30));
        _ = TrainInBackground(spec, _cancel.Token);
        logger.LogInformation("Run {Run} started: {Model}, batch {Batch}, chunk {Chunk}, {Workers} workers, {Epochs} epochs",
            RunId, spec.Model.Describe(), spec.BatchSize, spec.ChunkSize, spec.Workers, spec.Epochs);
        return Status();
    }

    public Task<RunStatus> GetStatus() => Task.FromResult(Status());

    public async Task<RunStatus> WaitForFinish(TimeSpan maxWait)
    {
        // Clamped well under the response timeout, whatever the caller asks.
        var wait = maxWait < TimeSpan.Zero ? TimeSpan.Zero : maxWait > MaxWait ? MaxWait : maxWait;
        if (record.State.State == RunState.Running)
            await Task.WhenAny(_finished.Task, Task.Delay(wait));
        return Status();
    }

    public Task<RunStatus> Cancel()
    {
        _cancel?.Cancel();
        return Task.FromResult(Status());
    }

    public async Task<TrainedModel> GetModel()
    {
        var spec = record.State.Spec ?? throw new InvalidOperationException($"run '{RunId}' does not exist");
        var current = await GrainFactory.GetGrain<IParameterServerGrain>(RunId).GetParameters();
        return new TrainedModel(spec, current.Parameters, current.Step);
    }

    private RunStatus Status() => new(
        RunId, record.State.State, record.State.Spec, _epoch, _stepInEpoch, _stepsPerEpoch,
        record.State.Epochs.ToArray(), record.State.Error, _workerSilos.ToArray(), RuntimeIdentity);

    private async Task TrainInBackground(RunSpec spec, CancellationToken cancel)
    {
        try
        {
            await Train(spec, cancel);
            record.State.State = RunState.Completed;
        }
        catch (OperationCanceledException) when (cancel.IsCancellationRequested)
        {
            record.State.State = RunState.Cancelled;
        }
        catch (Exception e)
        {
            logger.LogError(e, "Run {Run} failed", RunId);
            record.State.State = RunState.Failed;
            record.State.Error = e.Message;
        }
        logger.LogInformation("Run {Run} {State}", RunId, record.State.State);
        try
        {
            await record.WriteAuthoritative();
        }
        catch (Exception e)
        {
            logger.LogError(e, "Run {Run}: could not store its final state", RunId);
        }
        _finished.TrySetResult();
        DelayDeactivation(TimeSpan.FromSeconds(-1));   // negative: back to normal idle collection
    }

    private async Task Train(RunSpec spec, CancellationToken cancel)
    {
        var data = await datasets.Get(spec.Dataset);
        int trainCount = spec.TrainCount(data.Train.Count);
        var server = GrainFactory.GetGrain<IParameterServerGrain>(RunId);
        var workers = Enumerable.Range(0, spec.Workers).Select(i => GrainFactory.GetGrain<IWorkerGrain>($"{RunId}/{i}")).ToArray();
        var current = await server.Initialize(spec);

        // The coordinator needs the plan's step and chunk counts only; workers rebuild its order themselves.
        var plan = new EpochPlan(trainCount, spec.BatchSize, spec.ChunkSize, spec.Seed, record.State.Epochs.Count);
        for (int epoch = record.State.Epochs.Count; epoch < spec.Epochs; epoch++)
        {
            if (plan.Epoch != epoch) plan.MoveTo(epoch);
            (_epoch, _stepInEpoch, _stepsPerEpoch) = (epoch, 0, plan.Steps);
            var clock = Stopwatch.StartNew();
            double lossSum = 0;
            for (int step = 0; step < plan.Steps; step++)
            {
                cancel.ThrowIfCancellationRequested();
                _stepInEpoch = step;
                var chunks = await ComputeStep(workers, spec, epoch, step, plan.ChunkCount(step), current);
                lossSum += chunks.Sum(c => c.LossSum);
                current = await server.ApplyStep(current.Step, chunks.Select(c => c.GradientSum).ToArray(), plan.StepSize(step));
            }
            double trainSeconds = clock.Elapsed.TotalSeconds;
            _stepInEpoch = plan.Steps;
            var eval = await Evaluate(workers, spec, data.Test.Count, current.Parameters);
            await server.Checkpoint();
            var result = new EpochResult(epoch + 1, lossSum / trainCount, eval.MeanLoss, eval.Accuracy, clock.Elapsed.TotalSeconds,
                trainCount / trainSeconds, ParameterHash.Sha256(current.Parameters.Span), current.Step, eval.Confusion);
            record.State.Epochs.Add(result);
            await record.WriteAuthoritative();
            logger.LogInformation("Run {Run} epoch {Epoch}: test accuracy {Accuracy:P2}, {Seconds:F1}s", RunId, epoch + 1, eval.Accuracy, result.Seconds);
        }
    }

    /// <summary>Chunk sums of one step, in chunk order. A worker whose call fails has its chunks redone by another.</summary>
    private async Task<ChunkResult[]> ComputeStep(IWorkerGrain[] workers, RunSpec spec, int epoch, int step, int chunkCount, ParameterVersion parameters)
    {
        var byWorker = Enumerable.Range(0, Math.Min(workers.Length, chunkCount))
            .Select(w => Enumerable.Range(0, chunkCount).Where(c => c % workers.Length == w).ToArray())
            .ToArray();
        var calls = byWorker.Select((chunks, w) => Call(w, chunks)).ToArray();
        var results = (await Task.WhenAll(calls)).SelectMany(r => r).OrderBy(r => r.Chunk).ToArray();
        if (results.Length != chunkCount || results.Where((r, i) => r.Chunk != i).Any())
            throw new InvalidOperationException($"step {step}: expected {chunkCount} chunk results, got {results.Length}");
        return results;

        async Task<ChunkResult[]> Call(int worker, int[] chunks)
        {
            var work = new ChunkWork(spec, epoch, step, chunks, parameters);
            for (int attempt = 0; ; attempt++)
            {
                var target = workers[(worker + attempt) % workers.Length];
                try
                {
                    var reply = await target.ComputeChunks(work);
                    _workerSilos.Add(reply.Silo);
                    return reply.Results;
                }
                catch (Exception e) when (attempt + 1 < MaxAttemptsPerStep && e is not ArgumentException)
                {
                    logger.LogWarning("Run {Run} step {Step}: worker {Worker} failed ({Error}); retrying its chunks", RunId, step, worker + attempt, e.Message);
                    await Task.Delay(TimeSpan.FromMilliseconds(250 * (attempt + 1)));
                }
            }
        }
    }

    /// <summary>The test set cut into one contiguous range per worker; counts add up exactly.</summary>
    private static async Task<Evaluation> Evaluate(IWorkerGrain[] workers, RunSpec spec, int testCount, FloatPayload parameters)
    {
        int parts = Math.Min(workers.Length, testCount);
        var calls = Enumerable.Range(0, parts).Select(w =>
            workers[w].Evaluate(new EvalWork(spec, (int)((long)testCount * w / parts), (int)((long)testCount * (w + 1) / parts), parameters)));
        var partials = await Task.WhenAll(calls);
        return partials.Aggregate((a, b) => a.Add(b));
    }
}
