using System.Numerics.Tensors;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Orleans.Placement;

namespace Backprop.Grains;

[GenerateSerializer]
public sealed class ParameterServerState
{
    [Id(0)] public RunSpec? Spec { get; set; }
    [Id(1)] public FloatPayload? Parameters { get; set; }
    [Id(2)] public FloatPayload? Velocity { get; set; }
    [Id(3)] public long Step { get; set; }
    [Id(4)] public int Incarnation { get; set; }
    [Id(5)] public double EpochLossSum { get; set; }
}

/// <summary>
/// Owns a run's parameters and optimizer state, in two pairs of buffers that a step alternates between (it
/// writes the new pair, and keeps it only when the gradient was finite), so nothing is copied or allocated per
/// step. A version handed out by reference inside the silo is read by that step's workers; its buffer is
/// rewritten two steps later, after all of them have replied (a worker still computing on an old version after
/// its call was given up on has its result dropped). Reads from outside the step (<see cref="GetParameters"/>)
/// get a copy.
/// Checkpoints every <see cref="RunSpec.CheckpointEvery"/> steps and when asked (epoch ends); after its
/// silo dies the next activation starts from the last checkpoint and the coordinator recomputes the rest,
/// which gives the same bits because a step depends only on the parameters and the step number.
/// Placed beside its first caller (the run's coordinator) so their per-step calls stay in-process.
/// </summary>
[PreferLocalPlacement]
public sealed class ParameterServerGrain(
    [PersistentState("parameters", SiloSetup.StorageName)] IPersistentState<ParameterServerState> state,
    ILocalSiloDetails silo) : Grain, IParameterServerGrain
{
    private RunSpec? _spec;
    private float[] _parameters = [];
    private float[] _velocity = [];
    // The step writes (θ', v') into these and swaps them in only when the whole gradient was finite.
    private float[] _nextParameters = [], _nextVelocity = [];
    private ReadOnlyMemory<float>[] _leaves = [];
    private readonly float[] _tile = new float[Tile];
    private float[] _scratch = [];
    /// <summary>Entries reduced, checked and stepped together, while they are in L1.</summary>
    private const int Tile = 4096;
    private long _step;
    private int _incarnation;
    private double _epochLossSum;
    private long _persistedStep = -1;

    public async Task<ServerPosition> Attach(RunSpec spec, int incarnation)
    {
        spec.Validate();
        if (incarnation < 1) throw new ArgumentException($"incarnation {incarnation} is not positive");
        if (_spec is null && state.RecordExists && state.State.Spec is { } stored)
        {
            Load(stored, state.State.Parameters!.Span.ToArray(), state.State.Velocity!.Span.ToArray(), state.State.Step);
            _incarnation = state.State.Incarnation;
            _epochLossSum = state.State.EpochLossSum;
            _persistedStep = state.State.Step;
        }
        if (_spec is null)
        {
            var parameters = Initializer.Create(spec.Model, spec.Init, spec.Seed);
            Load(spec, parameters, new float[parameters.Length], step: 0);
        }
        else if (_spec != spec)
        {
            throw new ArgumentException($"parameter server {this.GetPrimaryKeyString()} holds a different run");
        }
        if (incarnation < _incarnation)
            throw new StaleCoordinatorException($"coordinator incarnation {incarnation} is superseded by {_incarnation}");
        if (incarnation > _incarnation)
        {
            // Stored at once, so that the fence holds for a server activated after this one is lost.
            _incarnation = incarnation;
            await Write();
        }
        return new ServerPosition(Current(), _epochLossSum, state.State.Step, silo.SiloAddress.Endpoint.ToString());
    }

    public Task<ParameterVersion> GetParameters() =>
        _spec is null && !state.RecordExists
            ? throw new InvalidOperationException($"run '{this.GetPrimaryKeyString()}' has no parameters")
            : Task.FromResult(_spec is null
                ? new ParameterVersion(state.State.Step, state.State.Parameters!)
                : new ParameterVersion(_step, new FloatPayload((float[])_parameters.Clone())));

    public async Task<StepOutcome> ApplyStep(StepUpdate update)
    {
        var spec = _spec ?? throw new InvalidOperationException("parameter server is not attached to a coordinator");
        if (update.Incarnation != _incarnation)
            throw new StaleCoordinatorException($"a step from coordinator incarnation {update.Incarnation} arrived; incarnation {_incarnation} owns the run");
        if (update.Step < _step) return new StepOutcome(Current(), null);   // a duplicate: already applied
        if (update.Step > _step)
            throw new InvalidOperationException($"a step computed against version {update.Step} arrived, but the server is at version {_step}");
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        var sums = update.BlockSums;
        if (sums is null || sums.Length < 1 || sums.Length > spec.ChunksPerStep)
            throw new ArgumentException($"a step needs 1..{spec.ChunksPerStep} block sums, got {sums?.Length ?? 0}");
        if (update.Samples < 1 || update.Samples > spec.BatchSize)
            throw new ArgumentException($"a step's sample count {update.Samples} is outside 1..{spec.BatchSize}");
        foreach (var sum in sums)
            if (sum is null || sum.Length != _parameters.Length)
                throw new ArgumentException($"gradient of length {sum?.Length ?? 0} for {_parameters.Length} parameters");

        if (!StepFused(spec, sums, update.Samples))
            return new StepOutcome(Current(), "the gradient has non-finite values");
        (_parameters, _nextParameters) = (_nextParameters, _parameters);
        (_velocity, _nextVelocity) = (_nextVelocity, _velocity);
        foreach (var sum in sums) sum.Release();
        _step++;
        _epochLossSum = update.EpochLossSum;
        double seconds = System.Diagnostics.Stopwatch.GetElapsedTime(start).TotalSeconds;
        if (_step % spec.CheckpointEvery == 0) await Write();
        return new StepOutcome(Current(), null, seconds, GC.GetTotalAllocatedBytes(precise: false));
    }

    /// <summary>
    /// One pass, a tile at a time: the blocks' sums reduced with the tree's upper levels (they are the nodes of
    /// one level), the total checked, and the optimizer step written to the spare buffers. False, with the
    /// current parameters untouched, when the gradient has a non-finite value (an overflow to infinity in a tile's
    /// sum counts too).
    /// </summary>
    private bool StepFused(RunSpec spec, FloatPayload[] sums, int samples)
    {
        if (_leaves.Length != sums.Length) _leaves = new ReadOnlyMemory<float>[sums.Length];
        for (int i = 0; i < sums.Length; i++) _leaves[i] = sums[i].Memory;
        try
        {
            for (int start = 0; start < _parameters.Length; start += Tile)
            {
                int n = Math.Min(Tile, _parameters.Length - start);
                ReadOnlySpan<float> gradient = sums.Length == 1 ? _leaves[0].Span.Slice(start, n) : _tile.AsSpan(0, n);
                if (sums.Length > 1) PairwiseSum.SumRange(_leaves, start, _tile.AsSpan(0, n), _scratch);
                if (!float.IsFinite(TensorPrimitives.Sum(gradient))) return false;
                Optimizer.Step(spec.Optimizer, _parameters.AsSpan(start, n), gradient, samples, _velocity.AsSpan(start, n),
                    _nextParameters.AsSpan(start, n), _nextVelocity.AsSpan(start, n));
            }
            return true;
        }
        finally
        {
            Array.Clear(_leaves);
        }
    }

    public async Task Checkpoint(int incarnation)
    {
        if (_spec is null) throw new InvalidOperationException("parameter server is not attached to a coordinator");
        if (incarnation != _incarnation) throw new StaleCoordinatorException($"checkpoint from incarnation {incarnation}; {_incarnation} owns the run");
        if (_persistedStep == _step) return;
        await Write();
    }

    /// <summary>A silo stopping cleanly keeps the steps applied since the last checkpoint.</summary>
    public override async Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        if (_spec is null || _persistedStep == _step) return;
        try
        {
            await Write();
        }
        catch (Exception)
        {
            // The last checkpoint stays; the coordinator recomputes the steps after it.
        }
    }

    private async Task Write()
    {
        // Parameters that overflowed are never stored: the last good checkpoint stays for the diverged run.
        if (!float.IsFinite(TensorPrimitives.Sum<float>(_parameters))) return;
        var before = state.State;
        state.State = new ParameterServerState
        {
            Spec = _spec,
            // Serialized by the write below, during which no step runs (one call at a time).
            Parameters = new FloatPayload(_parameters),
            Velocity = new FloatPayload(_velocity),
            Step = _step,
            Incarnation = _incarnation,
            EpochLossSum = _epochLossSum,
        };
        try
        {
            await state.WriteAuthoritative((stored, mine) => stored.Incarnation > mine.Incarnation);
        }
        catch
        {
            state.State = before;
            throw;
        }
        _persistedStep = _step;
    }

    private void Load(RunSpec spec, float[] parameters, float[] velocity, long step)
    {
        _spec = spec;
        _parameters = parameters;
        _velocity = velocity;
        _nextParameters = new float[parameters.Length];
        _nextVelocity = new float[parameters.Length];
        _scratch = new float[PairwiseSum.ScratchFor(Tile, spec.ChunksPerStep)];
        _step = step;
    }

    private ParameterVersion Current() => new(_step, new FloatPayload(_parameters));
}

/// <summary>A newer coordinator owns the run: the caller must stop (never retried).</summary>
[GenerateSerializer]
public sealed class StaleCoordinatorException : Exception
{
    public StaleCoordinatorException(string message) : base(message) { }
}
