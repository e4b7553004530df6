using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Backprop.Grains.Placement;

namespace Backprop.Grains;

/// <summary>
/// Runs backprop on the chunks it is handed, step after step, and pushes each step's block gradient sum to the run's
/// parameter-server shards, which answer with the next version's slices once every block of the step is there: so
/// the worker holds the parameters of the step it computes next, and pulls them from the shards only when it does
/// not (its first step, a redo, a step whose pushes returned before the step was applied). Holds only caches (the silo's dataset, this epoch's plan,
/// buffers, the parameters of one version), so losing it loses nothing: the coordinator re-sends the work
/// elsewhere. Every message is checked against the spec before anything is allocated for it.
/// </summary>
// Caches only, and a worker grain per run generation: a finished run's workers let their buffers go after minutes,
// not Orleans' default quarter of an hour (a window call keeps a live one busy; one collected early only reloads).
[SpreadPlacement, CollectionAgeLimit(Minutes = 2)]
public sealed class WorkerGrain(DatasetCache datasets, WorkerSettings settings, ILocalSiloDetails silo, DataLane lane) : Grain, IWorkerGrain
{
    private StepGradient? _gradient;
    private EpochPlan? _plan;
    private RunSpec? _planSpec;
    private RunSpec? _validSpec;
    private string? _siloName;
    private (RunSpec Spec, string Sha256, RunData Data)? _data;
    /// <summary>The full parameter vector of version <see cref="_version"/> of the coordinator's attach <see cref="_session"/>; −1: none.</summary>
    private float[] _parameters = [];
    private long _version = -1, _session;
    private IParameterShardGrain[] _shards = [];
    private string[] _shardKeys = [];
    /// <summary>Each shard's silo and, on another silo, its data lane, as its last reply said.</summary>
    private string?[] _shardSilos = [], _shardLanes = [];
    private Task<PushReply>[] _pushes = [];
    private Task<ParameterVersion>[] _pulls = [];

    private string SiloName => _siloName ??= silo.SiloAddress.Endpoint.ToString();

    public async Task<BlockDone> ComputeBlock(BlockWork work)
    {
        if (work is null) throw new ArgumentException("no work");
        var spec = CheckSpec(work.Spec);
        var train = (await DataFor(spec, work.DatasetSha256)).Train;
        if (work.Epoch < 0 || work.Epoch >= spec.Epochs) throw new ArgumentException($"epoch {work.Epoch} is outside 0..{spec.Epochs - 1}");
        var plan = PlanFor(spec, work.Epoch, train.Count);
        if (work.Step < 0 || work.Step >= plan.Steps) throw new ArgumentException($"step {work.Step} is outside 0..{plan.Steps - 1}");
        if (work.Steps < 1 || work.Steps > plan.Steps - work.Step)
            throw new ArgumentException($"{work.Steps} steps from step {work.Step} are not within the epoch's {plan.Steps} steps");
        if (work.Version < 0) throw new ArgumentException($"version {work.Version} is negative");
        int chunkCount = plan.ChunkCount(work.Step);
        if (plan.ChunkCount(work.Step + work.Steps - 1) != chunkCount)
            throw new ArgumentException($"steps {work.Step} and {work.Step + work.Steps - 1} have different chunk counts: one cut does not fit both");
        var starts = work.BlockStarts;
        if (starts is null || work.Block < 0 || work.Block >= starts.Length || starts.Length > chunkCount)
            throw new ArgumentException($"block {work.Block} of a cut into {starts?.Length ?? 0} blocks (step {work.Step} has {chunkCount} chunks)");
        int first = starts[work.Block], end = work.Block + 1 < starts.Length ? starts[work.Block + 1] : chunkCount;
        if (!PairwiseSum.IsNode(first, end, chunkCount))
            throw new ArgumentException($"chunks [{first}, {end}) are not an aligned block of step {work.Step}'s {chunkCount} chunks (not a node of the reduction tree)");
        var gradient = GradientFor(spec);
        var input = spec.TrainingInput(train, work.Epoch);

        long allocatedAtStart = GC.GetTotalAllocatedBytes(precise: false);
        var window = new Window(this, spec, work, settings.ComputeDelayPerChunk * (end - first));
        try
        {
            await StepLoop.Run(gradient, input, plan, work.Step, work.Steps, work.Version, (first, end), window);
        }
        finally
        {
            // Pushes sent while a step was computed, whose step then failed: they read the sum's buffer until they end.
            await EndPushes();
        }
        return new BlockDone(first, window.Losses.ToArray(), SiloName, window.Compute, window.Pull, window.Push, window.Reduce, window.PulledAny,
            GC.GetTotalAllocatedBytes(precise: false), window.Wire, window.Divergence, allocatedAtStart);
    }

    /// <summary>
    /// A window of steps as this worker runs it in <see cref="StepLoop"/>: each step's parameters held or pulled from the
    /// shards, each block sum pushed to them; the steps' losses and where the time went, for the coordinator.
    /// </summary>
    /// <param name="delay">Tests only: extra compute time per step (<see cref="WorkerSettings.ComputeDelayPerChunk"/> × the block's chunks).</param>
    private sealed class Window(WorkerGrain worker, RunSpec spec, BlockWork work, TimeSpan delay) : IStepTarget
    {
        public List<double> Losses { get; } = new(work.Steps);
        public double Compute { get; private set; }
        public double Pull { get; private set; }
        public double Push { get; private set; }
        public double Reduce { get; private set; }
        public long Wire { get; private set; }
        public bool PulledAny { get; private set; }
        public string? Divergence { get; private set; }
        private double _lossBefore = work.EpochLossBefore;

        public GradientBlock? FusedUpdate => null;

        private readonly EarlyPushes _early = new(worker, spec, work);
        private bool _sendsEarly;

        public BlockProgress? Progress => _sendsEarly ? _early : null;

        // Pooled: these run once a step and usually suspend (a pull, a push), which would box a state machine each time.
        [System.Runtime.CompilerServices.AsyncMethodBuilder(typeof(System.Runtime.CompilerServices.PoolingAsyncValueTaskMethodBuilder<>))]
        public async ValueTask<float[]> Begin(StepStart step)
        {
            long start = System.Diagnostics.Stopwatch.GetTimestamp();
            var (pulled, bytes) = await worker.EnsureParameters(spec, work.Session, step.Version);
            (Pull, Wire, PulledAny) = (Pull + Seconds(System.Diagnostics.Stopwatch.GetTimestamp() - start), Wire + bytes, PulledAny || pulled);
            if (delay > TimeSpan.Zero)
            {
                // Before the compute, so that a slow worker's pushes, early ones too, leave late.
                long delaying = System.Diagnostics.Stopwatch.GetTimestamp();
                await Task.Delay(delay);
                Compute += Seconds(System.Diagnostics.Stopwatch.GetTimestamp() - delaying);
            }
            _sendsEarly = _early.Arm(step, _lossBefore);
            return worker._parameters;
        }

        [System.Runtime.CompilerServices.AsyncMethodBuilder(typeof(System.Runtime.CompilerServices.PoolingAsyncValueTaskMethodBuilder<>))]
        public async ValueTask<bool> Apply(StepBlock block)
        {
            Compute += block.ComputeSeconds;
            long pushing = System.Diagnostics.Stopwatch.GetTimestamp();
            var pushed = await worker.PushStep(spec, work, block.Step, block.Version, block.Samples, _lossBefore, block.Loss, block.Sum);
            (Push, Reduce, Wire, Divergence) = (Push + Seconds(System.Diagnostics.Stopwatch.GetTimestamp() - pushing), Reduce + pushed.Reduce, Wire + pushed.WireBytes, pushed.Divergence);
            if (pushed.StepLoss is not { } stepLoss) return false;
            Losses.Add(stepLoss);
            _lossBefore = pushed.EpochLossSum;
            return true;
        }
    }

    /// <summary>
    /// Sends a step's block sum to the shards on other silos slice by slice while it is computed: a shard's push leaves
    /// as soon as the backprop threads have written the whole of its slice (the sum's last chunk writes it range by
    /// range), so the bytes cross the network, and the shard may step its slice, while the rest is computed. The
    /// message is the one <see cref="PushStep"/> would send. Only shards whose last reply named a data lane: a local
    /// shard's pass would take a core from the compute, and a push through Orleans' connection would queue behind it.
    /// </summary>
    private sealed class EarlyPushes(WorkerGrain worker, RunSpec spec, BlockWork work) : BlockProgress
    {
        private readonly ShardLayout _layout = spec.Shards;
        private readonly int[] _left = new int[spec.Shards.Shards];
        private readonly int[] _ends = Enumerable.Range(0, spec.Shards.Shards).Select(spec.Shards.End).ToArray();
        private StepStart _step;
        private double _lossBefore, _loss;

        /// <summary>Ready for step <paramref name="step"/>; false when no shard is reached through a lane (then nothing is sent early).</summary>
        public bool Arm(StepStart step, double lossBefore)
        {
            bool any = false;
            for (int j = 0; j < _left.Length; j++)
            {
                bool early = j < worker._shardLanes.Length && worker._shardLanes[j] is not null;
                _left[j] = early ? _layout.Length(j) : -1;
                any |= early;
            }
            (_step, _lossBefore) = (step, lossBefore);
            return any;
        }

        protected override void LossKnown(double loss) => _loss = loss;

        protected override void Written(int start, int length)
        {
            int end = start + length, j = Array.BinarySearch(_ends, start);
            for (j = j < 0 ? ~j : j + 1; j < _left.Length && _layout.Start(j) < end; j++)
            {
                int part = Math.Min(end, _layout.End(j)) - Math.Max(start, _layout.Start(j));
                if (_left[j] > 0 && Interlocked.Add(ref _left[j], -part) == 0) worker.SendEarly(j, Push(j));
            }
        }

        public GradientPush Push(int j) => worker.Push(work, _step.Version, _step.Samples, _lossBefore, _loss, Sum.Slice(_layout.Start(j), _layout.Length(j)));
    }

    private GradientPush Push(BlockWork work, long version, int samples, double lossBefore, double loss, ReadOnlyMemory<float> slice) =>
        new(work.Incarnation, version, work.Block, work.BlockStarts, samples, lossBefore, loss, new FloatPayload(slice), work.Session);

    /// <summary>Shard <paramref name="j"/>'s push, started on the thread pool: the caller is a backprop thread with the rest of the step to compute.</summary>
    private void SendEarly(int j, GradientPush push)
    {
        BackpropMetrics.EarlyPush();
        // Without the backprop thread's execution context: it is that of the call that made the thread, long over.
        using (ExecutionContext.SuppressFlow()) Volatile.Write(ref _pushes[j], Task.Run(() => Send(j, push)));
    }

    private Task<PushReply> Send(int j, GradientPush push)
    {
        var shard = _shards[j];
        return _shardLanes[j] is { } shardLane ? lane.Push(shardLane, _shardKeys[j], push, () => shard.Push(push)) : shard.Push(push);
    }

    /// <summary>Waits for every push still in flight (their step failed) and lets their replies go.</summary>
    private async Task EndPushes()
    {
        if (Array.TrueForAll(_pushes, p => p is null)) return;
        await WhenAllEnded([.. _pushes.Where(p => p is not null)]);
        foreach (var pending in _pushes) if (pending is { IsCompletedSuccessfully: true }) pending.Result.Next?.Parameters.Release();
        Array.Clear(_pushes);
    }

    /// <summary>
    /// Pushes one step's block sum to every shard (those not sent early by <see cref="EarlyPushes"/>) and takes the next version from their replies. The step's loss is
    /// null when a shard refused the step (divergence) or did not confirm it within its wait: this worker stops there,
    /// keeping the version it computed on, still good for a redo.
    /// </summary>
    private async Task<(double? StepLoss, double EpochLossSum, string? Divergence, double Reduce, long WireBytes)> PushStep(
        RunSpec spec, BlockWork work, int step, long version, int samples, double lossBefore, double loss, ReadOnlyMemory<float> sum)
    {
        // Each shard copies its slice of the sum before it answers, so the buffer is free again once all have.
        var layout = spec.Shards;
        for (int j = 0; j < _shards.Length; j++)
            _pushes[j] ??= Send(j, Push(work, version, samples, lossBefore, loss, sum.Slice(layout.Start(j), layout.Length(j))));
        double reduce = 0;
        long wire = 0;
        string? divergence = null;
        bool applied = true;
        try
        {
            // Every push ends before this call does, failed or not: a push still being serialized reads the sum's buffer.
            await WhenAllEnded(_pushes);
            for (int j = 0; j < _pushes.Length; j++)
            {
                var reply = await _pushes[j];
                (_shardSilos[j], _shardLanes[j]) = (reply.Silo, reply.Silo == SiloName ? null : reply.Lane);
                if (reply.Silo != SiloName) wire += 4L * layout.Length(j);
                reduce = Math.Max(reduce, reply.ReduceAndStepSeconds);
                divergence ??= reply.Divergence;
                applied &= reply.Next?.Step == version + 1;
            }
            if (!applied || divergence is not null) return (null, 0, divergence, reduce, wire);
            // Only a complete next version replaces the one held: with a slice missing, the old one stays good for a redo.
            _version = -1;
            var first = _pushes[0].Result;
            for (int j = 0; j < _pushes.Length; j++)
            {
                var reply = _pushes[j].Result;
                var next = reply.Next!.Parameters;
                if (next.Length != layout.Length(j)) throw new InvalidDataException($"shard {j} sent {next.Length} parameters for its {layout.Length(j)}");
                // Every shard added the same block losses in the same order: a difference means they hold different steps.
                if (!reply.StepLoss.Equals(first.StepLoss) || !reply.EpochLossSum.Equals(first.EpochLossSum))
                    throw new InvalidDataException($"shards 0 and {j} disagree on step {version}'s loss ({first.StepLoss} and {reply.StepLoss})");
                next.Span.CopyTo(_parameters.AsSpan(layout.Start(j)));
                if (_shardSilos[j] != SiloName) wire += 4L * next.Length;
            }
            _version = version + 1;
            return (first.StepLoss, first.EpochLossSum, null, reduce, wire);
        }
        finally
        {
            foreach (var pending in _pushes) if (pending.IsCompletedSuccessfully) pending.Result.Next?.Parameters.Release();
            Array.Clear(_pushes);
        }
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
            _shardKeys = Enumerable.Range(0, layout.Shards).Select(j => $"{run}/{j}").ToArray();
            _shards = _shardKeys.Select(key => GrainFactory.GetGrain<IParameterShardGrain>(key)).ToArray();
            (_shardSilos, _shardLanes) = (new string?[layout.Shards], new string?[layout.Shards]);
            (_pushes, _pulls) = (new Task<PushReply>[layout.Shards], new Task<ParameterVersion>[layout.Shards]);
            (_parameters, _version) = (new float[layout.Parameters], -1);
        }
        if (_version == version && _session == session) return (false, 0);
        _version = -1;
        long wire = 0;
        for (int j = 0; j < _shards.Length; j++)
        {
            var shard = _shards[j];
            _pulls[j] = _shardLanes[j] is { } shardLane ? lane.Pull(shardLane, _shardKeys[j], session, version, () => shard.Pull(session, version)) : shard.Pull(session, version);
        }
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
        var data = await DataFor(spec, work.DatasetSha256);
        var (set, kind) = work.Validation ? (data.Validation, "validation") : (data.Test, "test");
        int count = set.Count;
        if (work.Start < 0 || work.Start >= work.End || work.End > count)
            throw new ArgumentException($"evaluation range [{work.Start}, {work.End}) is not within the {count} {kind} samples");
        if (work.Version < 0) throw new ArgumentException($"version {work.Version} is negative");
        var runner = GradientFor(spec).Runner;
        await EnsureParameters(spec, work.Session, work.Version);
        return runner.Evaluate(set, _parameters, work.Start, work.End);
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

    /// <summary>A run's cut of a silo's data set: what it trains on, what it holds out (<see cref="RunSpec.Split"/>), and the test set.</summary>
    private sealed record RunData(Backprop.Core.Data.Dataset Train, Backprop.Core.Data.Dataset Validation, Backprop.Core.Data.Dataset Test);

    /// <summary>This silo's copy of the run's data set; refuses to compute on other samples than the run's.</summary>
    private async ValueTask<RunData> DataFor(RunSpec spec, string expectedSha256)
    {
        // Checked once per spec and hash, not on every step.
        if (_data is { } known && known.Spec == spec && known.Sha256 == expectedSha256) return known.Data;
        Backprop.Core.Data.TrainTest data;
        try
        {
            data = await datasets.Get(spec.Dataset, expectedSha256);
        }
        catch (DataMismatchException e)
        {
            throw new DataMismatchException($"silo {silo.SiloAddress.Endpoint}: {e.Message}");
        }
        spec.ValidateAgainst(data.Train);
        var (train, validation) = spec.Split(data.Train);
        _data = (spec, expectedSha256, new RunData(train, validation, data.Test));
        return _data.Value.Data;
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
