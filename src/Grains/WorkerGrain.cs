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
    private StepGradient? _gradient;
    private EpochPlan? _plan;
    private RunSpec? _planSpec;
    private RunSpec? _validSpec;
    private string? _siloName;
    private (RunSpec Spec, string Sha256, Backprop.Core.Data.TrainTest Data)? _data;
    /// <summary>The last sum handed out from each of the worker's two sets of buffers, and its step.</summary>
    private (FloatPayload Sum, int Epoch, int Step)? _lentMain, _lentSpare;

    public async Task<BlockSum> ComputeBlock(BlockWork work)
    {
        var spec = CheckSpec(work.Spec);
        var train = (await DataFor(spec, work.DatasetSha256)).Train;
        if (work.Epoch < 0 || work.Epoch >= spec.Epochs) throw new ArgumentException($"epoch {work.Epoch} is outside 0..{spec.Epochs - 1}");
        var plan = PlanFor(spec, work.Epoch, spec.TrainCount(train.Count));
        if (work.Step < 0 || work.Step >= plan.Steps) throw new ArgumentException($"step {work.Step} is outside 0..{plan.Steps - 1}");
        int chunkCount = plan.ChunkCount(work.Step);
        if (!PairwiseSum.IsNode(work.FirstChunk, work.EndChunk, chunkCount))
            throw new ArgumentException($"chunks [{work.FirstChunk}, {work.EndChunk}) are not an aligned block of step {work.Step}'s {chunkCount} chunks (not a node of the reduction tree)");
        var gradient = GradientFor(spec);
        var parameters = work.Parameters?.Parameters;
        CheckParameters(parameters, gradient.ParameterCount);

        // A sum lives in this worker's buffers: passed by reference inside the silo, serialized after this call
        // returns for a remote coordinator, and rewritten by the next step's call (which comes only after the
        // server used it). A second block of the same step (a retry of another worker's) may arrive before that:
        // it goes to the spare buffers, and a third detaches the first one's sum (a copy) before reusing them.
        bool sameStep = _lentMain is { } main && main.Epoch == work.Epoch && main.Step == work.Step;
        bool spare = sameStep && !(_lentSpare is { } lent && lent.Epoch == work.Epoch && lent.Step == work.Step);
        if (sameStep && !spare) _lentMain!.Value.Sum.Detach();
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        // The same block of the next step is this worker's too while the worker count stays: fetch its samples meanwhile.
        double loss = gradient.SumBlock(train, plan, work.Step, work.FirstChunk, work.EndChunk, parameters!.Span, nextStepChunk: work.FirstChunk, spare);
        double seconds = System.Diagnostics.Stopwatch.GetElapsedTime(start).TotalSeconds;
        parameters.Release();
        var sum = new FloatPayload(gradient.Result);
        if (spare) _lentSpare = (sum, work.Epoch, work.Step);
        else _lentMain = (sum, work.Epoch, work.Step);
        return new BlockSum(work.FirstChunk, sum, loss, _siloName ??= silo.SiloAddress.Endpoint.ToString(),
            seconds, GC.GetTotalAllocatedBytes(precise: false));
    }

    public async Task<BlockSum[]> ComputeBlocks(BlockGroupWork work)
    {
        var blocks = work.Blocks;
        if (blocks is null || work.Workers is null || blocks.Length < 1 || blocks.Length > RunSpec.MaxWorkers || work.Workers.Length != blocks.Length)
            throw new ArgumentException($"a group of {blocks?.Length ?? 0} blocks for {work.Workers?.Length ?? 0} workers");
        var first = blocks[0] ?? throw new ArgumentException("a group without its first block");
        foreach (var block in blocks)
            if (block is null || block.Parameters != first.Parameters || block.Spec != first.Spec || block.Step != first.Step || block.Epoch != first.Epoch)
                throw new ArgumentException("the blocks of a group must be of one step and one parameter version");
        // The first block is this worker's (computed here, not called); the others go to distinct other workers. A
        // member that is this worker would call itself and wait on its own turn until the response timeout.
        var self = this.GetGrainId();
        if (work.Workers[0] is not { } lead || lead.GetGrainId() != self)
            throw new ArgumentException("the first worker of a group must be the worker it is sent to");
        for (int i = 1; i < work.Workers.Length; i++)
        {
            var member = work.Workers[i]?.GetGrainId();
            bool repeated = member is null || member == self;
            for (int j = 1; j < i && !repeated; j++) repeated = work.Workers[j].GetGrainId() == member;
            if (repeated) throw new ArgumentException($"worker {i} of the group is missing, repeated or the group's first worker");
        }
        // The parameters are read by the other workers of this silo too: this call owns the pooled array until all are done.
        var lease = first.Parameters.Parameters.Own();
        try
        {
            var calls = new Task<BlockSum>[blocks.Length];
            for (int i = 1; i < blocks.Length; i++) calls[i] = work.Workers[i].ComputeBlock(blocks[i]);
            calls[0] = ComputeBlock(first);
            // Every call ends, failed or not, before the parameters' array can go back to the pool.
            return await Task.WhenAll(calls);
        }
        finally
        {
            lease.Return();
        }
    }

    public async Task<Evaluation> Evaluate(EvalWork work)
    {
        var spec = CheckSpec(work.Spec);
        var test = (await DataFor(spec, work.DatasetSha256)).Test;
        if (work.Start < 0 || work.Start >= work.End || work.End > test.Count)
            throw new ArgumentException($"evaluation range [{work.Start}, {work.End}) is not within the {test.Count} test samples");
        var runner = GradientFor(spec).Runner;
        CheckParameters(work.Parameters, runner.ParameterCount);
        var result = runner.Evaluate(test, work.Parameters!.Span, work.Start, work.End);
        work.Parameters.Release();
        return result;
    }

    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        _gradient?.Dispose();
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
    private async ValueTask<Backprop.Core.Data.TrainTest> DataFor(RunSpec spec, string expectedSha256)
    {
        // Checked once per spec and hash, not on every step.
        if (_data is { } known && known.Spec == spec && known.Sha256 == expectedSha256) return known.Data;
        string sha = await datasets.Sha256(spec.Dataset);
        if (sha != expectedSha256)
            throw new DataMismatchException(
                $"silo {silo.SiloAddress.Endpoint}: its data set '{spec.Dataset}' (sha256 {sha[..12]}...) differs from the run's ({expectedSha256}); check {datasets.DataDir}");
        var data = await datasets.Get(spec.Dataset);
        spec.ValidateAgainst(data.Train);
        _data = (spec, expectedSha256, data);
        return data;
    }

    private static void CheckParameters(FloatPayload? parameters, int expected)
    {
        if (parameters is null || parameters.Length != expected)
            throw new ArgumentException($"{parameters?.Length ?? 0} parameters sent for a model of {expected}");
    }

    private StepGradient GradientFor(RunSpec spec)
    {
        var runner = _gradient?.Runner;
        if (runner is null || !runner.Spec.Equals(spec.Model) || runner.MaxChunk != spec.ChunkSize || _gradient!.MaxChunks != spec.ChunksPerStep)
        {
            _gradient?.Dispose();
            _gradient = null;
            _gradient = new StepGradient(spec.Model, spec.ChunkSize, spec.ChunksPerStep, settings.ThreadsPerWorker);
        }
        return _gradient;
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
