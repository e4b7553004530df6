using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Backprop.Grains.Placement;

namespace Backprop.Grains;

/// <summary>
/// Runs backprop on the chunks it is handed. Holds only caches (the silo's dataset, this epoch's plan,
/// buffers), so losing it loses nothing: the coordinator re-sends the work elsewhere.
/// </summary>
[SpreadPlacement]
public sealed class WorkerGrain(DatasetCache datasets, WorkerSettings settings) : Grain, IWorkerGrain
{
    private ChunkRunner? _runner;
    private EpochPlan? _plan;
    private RunSpec? _planSpec;

    public async Task<ChunkResults> ComputeChunks(ChunkWork work)
    {
        var spec = work.Spec;
        var train = (await datasets.Get(spec.Dataset)).Train;
        var plan = PlanFor(spec, work.Epoch, spec.TrainCount(train.Count));
        var runner = RunnerFor(spec);
        var parameters = work.Parameters.Parameters.Span;
        var results = new ChunkResult[work.Chunks.Length];
        for (int i = 0; i < work.Chunks.Length; i++)
        {
            var indices = plan.Chunk(work.Step, work.Chunks[i]);
            var gradient = new float[runner.ParameterCount];
            var next = i + 1 < work.Chunks.Length ? plan.Chunk(work.Step, work.Chunks[i + 1]) : default;
            double loss = runner.GradientSum(train, parameters, indices, gradient, next);
            results[i] = new ChunkResult(work.Chunks[i], new FloatPayload(gradient), loss, indices.Length);
        }
        return new ChunkResults(results, RuntimeIdentity);
    }

    public async Task<Evaluation> Evaluate(EvalWork work)
    {
        var test = (await datasets.Get(work.Spec.Dataset)).Test;
        return RunnerFor(work.Spec).Evaluate(test, work.Parameters.Span, work.Start, work.End);
    }

    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        _runner?.Dispose();
        return Task.CompletedTask;
    }

    private ChunkRunner RunnerFor(RunSpec spec)
    {
        if (_runner is null || !_runner.Spec.Equals(spec.Model) || _runner.MaxChunk != spec.ChunkSize)
        {
            _runner?.Dispose();
            _runner = new ChunkRunner(spec.Model, spec.ChunkSize, settings.ThreadsPerWorker);
        }
        return _runner;
    }

    private EpochPlan PlanFor(RunSpec spec, int epoch, int count)
    {
        if (_plan is null || _planSpec != spec || _plan.SampleCount != count)
        {
            _plan = new EpochPlan(count, spec.BatchSize, spec.ChunkSize, spec.Seed, epoch);
            _planSpec = spec;
        }
        else if (_plan.Epoch != epoch)
        {
            _plan.MoveTo(epoch);
        }
        return _plan;
    }
}
