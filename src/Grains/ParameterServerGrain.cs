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
}

/// <summary>
/// Owns a run's parameters and optimizer state. Each step publishes a new parameter array and never
/// writes to one it has handed out, so payloads passed by reference inside a silo stay immutable.
/// Placed beside its first caller (the run's coordinator) so their per-step calls stay in-process.
/// </summary>
[PreferLocalPlacement]
public sealed class ParameterServerGrain(
    [PersistentState("parameters", SiloSetup.StorageName)] IPersistentState<ParameterServerState> state) : Grain, IParameterServerGrain
{
    private RunSpec? _spec;
    private float[] _parameters = [];
    private float[] _velocity = [];
    private float[] _total = [];
    private long _step;

    public override Task OnActivateAsync(CancellationToken cancellationToken)
    {
        if (state.RecordExists && state.State.Spec is { } spec)
        {
            Load(spec, state.State.Parameters!.Span.ToArray(), state.State.Step);
            state.State.Velocity!.Span.CopyTo(_velocity);
        }
        return Task.CompletedTask;
    }

    public Task<ParameterVersion> Initialize(RunSpec spec)
    {
        if (_spec is not null)
        {
            if (_spec != spec) throw new InvalidOperationException($"parameter server {this.GetPrimaryKeyString()} already holds a different run");
            return Task.FromResult(Current());
        }
        Load(spec, Initializer.Create(spec.Model, spec.Init, spec.Seed), step: 0);
        return Task.FromResult(Current());
    }

    public Task<ParameterVersion> GetParameters() => Task.FromResult(Current());

    public Task<ParameterVersion> ApplyStep(long expectedStep, FloatPayload[] chunkSums, int samples)
    {
        var spec = _spec ?? throw new InvalidOperationException("parameter server is not initialized");
        if (expectedStep != _step)
            throw new InvalidOperationException($"a step computed against version {expectedStep} arrived, but the server is at version {_step}");
        foreach (var sum in chunkSums)
            if (sum.Length != _parameters.Length)
                throw new ArgumentException($"gradient of length {sum.Length} for {_parameters.Length} parameters");
        GradientReduction.SumInChunkOrder(chunkSums.Select(c => c.Memory).ToArray(), _total);
        var next = (float[])_parameters.Clone();
        Optimizer.Step(spec.Optimizer, next, _total, samples, _velocity);
        _parameters = next;
        _step++;
        return Task.FromResult(Current());
    }

    public async Task Checkpoint()
    {
        if (_spec is null) return;
        state.State.Spec = _spec;
        state.State.Parameters = new FloatPayload(_parameters);
        state.State.Velocity = new FloatPayload((float[])_velocity.Clone());
        state.State.Step = _step;
        await state.WriteAuthoritative();
    }

    private void Load(RunSpec spec, float[] parameters, long step)
    {
        _spec = spec;
        _parameters = parameters;
        _velocity = new float[parameters.Length];
        _total = new float[parameters.Length];
        _step = step;
    }

    private ParameterVersion Current() => new(_step, new FloatPayload(_parameters));
}
