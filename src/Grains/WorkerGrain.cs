using Backprop.Core.Model;
using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Backprop.Grains.Placement;

namespace Backprop.Grains;

/// <summary>
/// Runs backprop on the chunks it is handed. Holds only caches (the silo's dataset, this epoch's plan,
/// buffers), so losing it loses nothing: the coordinator re-sends the work elsewhere. Every message is
/// checked against the spec before anything is allocated for it.
/// </summary>
[SpreadPlacement]
public sealed class WorkerGrain(DatasetCache datasets, WorkerSettings settings, ILocalSiloDetails silo) : Grain, IWorkerGrain
{
    private ChunkRunner? _runner;
    private EpochPlan? _plan;
    private RunSpec? _planSpec;
    private RunSpec? _validSpec;

    public async Task<ChunkResults> ComputeChunks(ChunkWork work)
    {
        var spec = CheckSpec(work.Spec);
        var train = (await DataFor(spec, work.DatasetSha256)).Train;
        if (work.Epoch < 0 || work.Epoch >= spec.Epochs) throw new ArgumentException($"epoch {work.Epoch} is outside 0..{spec.Epochs - 1}");
        var plan = PlanFor(spec, work.Epoch, spec.TrainCount(train.Count));
        if (work.Step < 0 || work.Step >= plan.Steps) throw new ArgumentException($"step {work.Step} is outside 0..{plan.Steps - 1}");
        int chunkCount = plan.ChunkCount(work.Step);
        if (work.Chunks is null || work.Chunks.Length < 1 || work.Chunks.Length > chunkCount)
            throw new ArgumentException($"step {work.Step} has {chunkCount} chunks; {work.Chunks?.Length ?? 0} were sent");
        foreach (int c in work.Chunks)
            if (c < 0 || c >= chunkCount) throw new ArgumentException($"chunk {c} is outside 0..{chunkCount - 1}");
        var runner = RunnerFor(spec);
        CheckParameters(work.Parameters?.Parameters, runner.ParameterCount);

        var parameters = work.Parameters!.Parameters.Span;
        var results = new ChunkResult[work.Chunks.Length];
        for (int i = 0; i < work.Chunks.Length; i++)
        {
            var indices = plan.Chunk(work.Step, work.Chunks[i]);
            var gradient = new float[runner.ParameterCount];
            var next = i + 1 < work.Chunks.Length ? plan.Chunk(work.Step, work.Chunks[i + 1]) : default;
            double loss = runner.GradientSum(train, parameters, indices, gradient, next);
            results[i] = new ChunkResult(work.Chunks[i], new FloatPayload(gradient), loss, indices.Length);
        }
        return new ChunkResults(results, silo.SiloAddress.Endpoint.ToString());
    }

    public async Task<Evaluation> Evaluate(EvalWork work)
    {
        var spec = CheckSpec(work.Spec);
        var test = (await DataFor(spec, work.DatasetSha256)).Test;
        if (work.Start < 0 || work.Start >= work.End || work.End > test.Count)
            throw new ArgumentException($"evaluation range [{work.Start}, {work.End}) is not within the {test.Count} test samples");
        var runner = RunnerFor(spec);
        CheckParameters(work.Parameters, runner.ParameterCount);
        return runner.Evaluate(test, work.Parameters!.Span, work.Start, work.End);
    }

    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        _runner?.Dispose();
        return Task.CompletedTask;
    }

    private RunSpec CheckSpec(RunSpec? spec)
    {
        if (spec is null) throw new ArgumentException("work without a run spec");
        if (spec != _validSpec)
        {
            spec.Validate(settings.ThreadsPerWorker);
            _validSpec = spec;
        }
        return spec;
    }

    /// <summary>This silo's copy of the run's data set; refuses to compute on other samples than the run's.</summary>
    private async Task<Backprop.Core.Data.TrainTest> DataFor(RunSpec spec, string expectedSha256)
    {
        string sha = await datasets.Sha256(spec.Dataset);
        if (sha != expectedSha256)
            throw new DataMismatchException(
                $"silo {silo.SiloAddress.Endpoint}: its data set '{spec.Dataset}' (sha256 {sha[..12]}...) differs from the run's ({expectedSha256}); check {datasets.DataDir}");
        var data = await datasets.Get(spec.Dataset);
        spec.ValidateAgainst(data.Train);
        return data;
    }

    private static void CheckParameters(FloatPayload? parameters, int expected)
    {
        if (parameters is null || parameters.Length != expected)
            throw new ArgumentException($"{parameters?.Length ?? 0} parameters sent for a model of {expected}");
    }

    private ChunkRunner RunnerFor(RunSpec spec)
    {
        if (_runner is null || !_runner.Spec.Equals(spec.Model) || _runner.MaxChunk != spec.ChunkSize)
        {
            _runner?.Dispose();
            _runner = null;
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

/// <summary>A silo's data set differs from the run's: the work may be retried on another silo.</summary>
[GenerateSerializer]
public sealed class DataMismatchException : Exception
{
    public DataMismatchException(string message) : base(message) { }
}
