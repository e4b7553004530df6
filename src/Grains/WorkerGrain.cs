using Backprop.Core.Model;
using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Backprop.Grains.Placement;

namespace Backprop.Grains;

/// <summary>
/// Runs backprop on the chunks it is handed and pushes the block's gradient sum to the run's parameter-server
/// shards, which answer with the next version's slices: so the worker holds the parameters of the step it will
/// compute next, and pulls them from the shards only when it does not (its first step, a redo, a step whose
/// pushes returned before the step was applied). Holds only caches (the silo's dataset, this epoch's plan,
/// buffers, the parameters of one version), so losing it loses nothing: the coordinator re-sends the work
/// elsewhere. Every message is checked against the spec before anything is allocated for it.
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
    /// <summary>The full parameter vector of version <see cref="_version"/> of the coordinator's attach <see cref="_session"/>; −1: none.</summary>
    private float[] _parameters = [];
    private long _version = -1, _session;
    private IParameterShardGrain[] _shards = [];
    private string?[] _shardSilos = [];
    private Task<PushReply>[] _pushes = [];
    private Task<ParameterVersion>[] _pulls = [];

    private string SiloName => _siloName ??= silo.SiloAddress.Endpoint.ToString();

    public async Task<BlockDone> ComputeBlock(BlockWork work)
    {
        if (work is null) throw new ArgumentException("no work");
        var spec = CheckSpec(work.Spec);
        var train = (await DataFor(spec, work.DatasetSha256)).Train;
        if (work.Epoch < 0 || work.Epoch >= spec.Epochs) throw new ArgumentException($"epoch {work.Epoch} is outside 0..{spec.Epochs - 1}");
        var plan = PlanFor(spec, work.Epoch, spec.TrainCount(train.Count));
        if (work.Step < 0 || work.Step >= plan.Steps) throw new ArgumentException($"step {work.Step} is outside 0..{plan.Steps - 1}");
        if (work.Version < 0) throw new ArgumentException($"version {work.Version} is negative");
        int chunkCount = plan.ChunkCount(work.Step);
        var starts = work.BlockStarts;
        if (starts is null || work.Block < 0 || work.Block >= starts.Length || starts.Length > chunkCount)
            throw new ArgumentException($"block {work.Block} of a cut into {starts?.Length ?? 0} blocks (step {work.Step} has {chunkCount} chunks)");
        int first = starts[work.Block], end = work.Block + 1 < starts.Length ? starts[work.Block + 1] : chunkCount;
        if (!PairwiseSum.IsNode(first, end, chunkCount))
            throw new ArgumentException($"chunks [{first}, {end}) are not an aligned block of step {work.Step}'s {chunkCount} chunks (not a node of the reduction tree)");
        var gradient = GradientFor(spec);

        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        var (pulled, wire) = await EnsureParameters(spec, work.Session, work.Version);
        long computing = System.Diagnostics.Stopwatch.GetTimestamp();
        // The same block of the next step is this worker's too while the worker count stays: fetch its samples meanwhile.
        double loss = gradient.SumBlock(train, plan, work.Step, first, end, _parameters, nextStepChunk: first);
        long pushing = System.Diagnostics.Stopwatch.GetTimestamp();

        // Each shard copies its slice of the sum before it answers, so the buffer is free again once all have.
        var sum = gradient.Result;
        var layout = spec.Shards;
        for (int j = 0; j < _shards.Length; j++)
            _pushes[j] = _shards[j].Push(new GradientPush(work.Incarnation, work.Version, work.Block, starts, plan.StepSize(work.Step),
                work.EpochLossBefore, loss, new FloatPayload(sum.Slice(layout.Start(j), layout.Length(j))), work.Session));
        double reduce = 0;
        string? divergence = null;
        bool applied = true;
        try
        {
            // Every push ends before this call does, failed or not: a push still being serialized reads the sum's buffer.
            await WhenAllEnded(_pushes);
            for (int j = 0; j < _pushes.Length; j++)
            {
                var reply = await _pushes[j];
                _shardSilos[j] = reply.Silo;
                if (reply.Silo != SiloName) wire += 4L * layout.Length(j);
                reduce = Math.Max(reduce, reply.ReduceAndStepSeconds);
                divergence ??= reply.Divergence;
                applied &= reply.Next?.Step == work.Version + 1;
            }
            // Only a complete next version replaces the one held: with a slice missing, the old one stays good for a redo.
            if (applied && divergence is null)
            {
                _version = -1;
                for (int j = 0; j < _pushes.Length; j++)
                {
                    var next = _pushes[j].Result.Next!.Parameters;
                    if (next.Length != layout.Length(j)) throw new InvalidDataException($"shard {j} sent {next.Length} parameters for its {layout.Length(j)}");
                    next.Span.CopyTo(_parameters.AsSpan(layout.Start(j)));
                    if (_shardSilos[j] != SiloName) wire += 4L * next.Length;
                }
                _version = work.Version + 1;
            }
        }
        finally
        {
            foreach (var push in _pushes) if (push.IsCompletedSuccessfully) push.Result.Next?.Parameters.Release();
            Array.Clear(_pushes);
        }
        long done = System.Diagnostics.Stopwatch.GetTimestamp();
        return new BlockDone(first, loss, SiloName, Seconds(pushing - computing), Seconds(computing - start), Seconds(done - pushing),
            reduce, pulled, GC.GetTotalAllocatedBytes(precise: false), wire, divergence, applied && divergence is null);
    }

    private static async Task WhenAllEnded(Task[] tasks)
    {
        try
        {
            await Task.WhenAll(tasks);
        }
        catch
        {
            // Each task's own error is read where its result is.
        }
    }

    /// <summary>Makes <see cref="_parameters"/> version <paramref name="version"/>: held already, or pulled from every shard.</summary>
    private async ValueTask<(bool Pulled, long WireBytes)> EnsureParameters(RunSpec spec, long session, long version)
    {
        var layout = spec.Shards;
        if (_shards.Length != layout.Shards || _parameters.Length != layout.Parameters)
        {
            string run = RunId();
            _shards = Enumerable.Range(0, layout.Shards).Select(j => GrainFactory.GetGrain<IParameterShardGrain>($"{run}/{j}")).ToArray();
            (_shardSilos, _pushes, _pulls) = (new string?[layout.Shards], new Task<PushReply>[layout.Shards], new Task<ParameterVersion>[layout.Shards]);
            (_parameters, _version) = (new float[layout.Parameters], -1);
        }
        if (_version == version && _session == session) return (false, 0);
        _version = -1;
        long wire = 0;
        for (int j = 0; j < _shards.Length; j++) _pulls[j] = _shards[j].Pull(session, version);
        try
        {
            await WhenAllEnded(_pulls);
            for (int j = 0; j < _pulls.Length; j++)
            {
                var slice = await _pulls[j];
                if (slice.Step != version || slice.Parameters is null || slice.Parameters.Length != layout.Length(j))
                    throw new InvalidDataException($"shard {j} sent version {slice.Step} with {slice.Parameters?.Length ?? 0} parameters for version {version}'s {layout.Length(j)}");
                slice.Parameters.Span.CopyTo(_parameters.AsSpan(layout.Start(j)));
                if (_shardSilos[j] != SiloName) wire += 4L * slice.Parameters.Length;
            }
        }
        finally
        {
            foreach (var pull in _pulls) if (pull.IsCompletedSuccessfully) pull.Result.Parameters?.Release();
            Array.Clear(_pulls);
        }
        (_version, _session) = (version, session);
        return (true, wire);
    }

    /// <summary>The run of this worker's key, "{runId}/{incarnation}.{generation}/{index}".</summary>
    private string RunId()
    {
        string key = this.GetPrimaryKeyString();
        int last = key.LastIndexOf('/');
        int generation = last > 0 ? key.LastIndexOf('/', last - 1) : -1;
        if (generation <= 0) throw new ArgumentException($"worker key '{key}' is not {{run}}/{{incarnation}}.{{generation}}/{{index}}");
        return key[..generation];
    }

    private static double Seconds(long ticks) => ticks / (double)System.Diagnostics.Stopwatch.Frequency;

    public async Task<Evaluation> Evaluate(EvalWork work)
    {
        if (work is null) throw new ArgumentException("no work");
        var spec = CheckSpec(work.Spec);
        var test = (await DataFor(spec, work.DatasetSha256)).Test;
        if (work.Start < 0 || work.Start >= work.End || work.End > test.Count)
            throw new ArgumentException($"evaluation range [{work.Start}, {work.End}) is not within the {test.Count} test samples");
        if (work.Version < 0) throw new ArgumentException($"version {work.Version} is negative");
        var runner = GradientFor(spec).Runner;
        await EnsureParameters(spec, work.Session, work.Version);
        return runner.Evaluate(test, _parameters, work.Start, work.End);
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
