using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;

namespace Backprop.Core.Training;

/// <summary>
/// The sync step in one process, without Orleans: the same plan, chunk sums, reduction order and
/// optimizer as the cluster. The cluster's parameters must equal these bit for bit. Allocates nothing
/// per step once constructed.
/// </summary>
public sealed class LocalTrainer : IDisposable, IStepTarget
{
    private readonly Dataset _train;
    private readonly Dataset _validation;
    private readonly RunSpec _spec;
    private readonly StepGradient _gradient;
    private readonly Optimizer _optimizer;
    private readonly float[] _optimizerState;
    private readonly GradientBlock _update;
    private readonly EpochPlan _plan;
    private readonly double[] _normSums;
    private readonly float[] _clipScratch;
    private int _stepSamples;
    private long _step;
    private double _lossSum;
    private int _samples;

    public LocalTrainer(RunSpec spec, Dataset train, int threads = 1)
    {
        spec.Validate(threads);
        if (spec.Validation >= train.Count)
            throw new ArgumentException($"validation: {spec.Validation} held-out images leave none of the {train.Count} training images to train on");
        _spec = spec;
        (_train, _validation) = spec.Split(train);
        spec = spec.Resolve(_train.Count);
        _gradient = new StepGradient(spec.Model, spec.ChunkSize, spec.ChunksPerStep, threads);
        Parameters = Initializer.Create(spec.Model, spec.Init, spec.Seed);
        _optimizer = spec.CreateOptimizer();
        _optimizerState = new float[checked(_optimizer.StateVectors * Parameters.Length)];
        _plan = new EpochPlan(_train.Count, spec.BatchSize, spec.ChunkSize, spec.Seed, epoch: 0);
        bool clips = spec.ClipNorm > 0;
        (_normSums, _clipScratch) = (new double[clips ? GradientClip.Tiles(Parameters.Length) : 0], new float[clips ? GradientClip.Tile : 0]);
        // The step is element-wise: each backprop thread updates the entries whose gradient sum it just finished.
        _update = (start, gradient) =>
        {
            var parameters = Parameters.AsSpan(start, gradient.Length);
            var state = new StateTile(_optimizerState, Parameters.Length, start, gradient.Length);
            _optimizer.Step(_step, parameters, gradient, _stepSamples, state, parameters, state);
        };
    }

    public float[] Parameters { get; }

    /// <summary>Trains one epoch, or its first <paramref name="maxSteps"/> steps; returns the mean training cost.</summary>
    public double TrainEpoch(int epoch, int maxSteps = int.MaxValue)
    {
        var plan = _plan;
        if (plan.Epoch != epoch) plan.MoveTo(epoch);
        (_lossSum, _samples) = (0, 0);
        // Every call of this target completes at once: the loop runs synchronously to its end.
        var steps = StepLoop.Run(_gradient, _spec.TrainingInput(_train, epoch), plan, 0, Math.Min(plan.Steps, maxSteps), (long)epoch * plan.Steps, block: null, this);
        if (!steps.IsCompleted) throw new InvalidOperationException("the local step loop did not complete synchronously");
        steps.GetAwaiter().GetResult();
        return _lossSum / _samples;
    }

    ValueTask<float[]> IStepTarget.Begin(StepStart step)
    {
        (_stepSamples, _step) = (step.Samples, step.Version);
        return new(Parameters);
    }

    /// <summary>Without clipping each step is applied in place as its last chunk's sums come out of the backprop threads.</summary>
    GradientBlock? IStepTarget.FusedUpdate => _spec.ClipNorm > 0 ? null : _update;

    ValueTask<bool> IStepTarget.Apply(StepBlock block)
    {
        if (_spec.ClipNorm > 0) ClippedStep(block.Sum.Span);
        (_lossSum, _samples) = (_lossSum + block.Loss, _samples + block.Samples);
        return new(true);
    }

    /// <summary>
    /// A step whose gradient is clipped: the norm needs the whole sum before any parameter changes, so the sum is
    /// finished first and then scaled and applied (the shards do the same, each over its slice).
    /// </summary>
    private void ClippedStep(ReadOnlySpan<float> gradient)
    {
        GradientClip.SquaredSums(gradient, _normSums);
        double total = GradientClip.Total(_normSums);
        // A non-finite gradient is stepped as it is, as without clipping: LocalTrainer does not judge divergence.
        float scale = double.IsFinite(total) ? GradientClip.Scale(total, _stepSamples, _spec.ClipNorm) : 1f;
        GradientClip.Step(_optimizer, _step, scale, _stepSamples, Parameters, gradient, _optimizerState, Parameters, _optimizerState, _clipScratch);
    }

    /// <summary>The held-out validation images (<see cref="RunSpec.Split"/>) under the current parameters.</summary>
    public Evaluation EvaluateValidation() => Evaluate(_validation, 0, _validation.Count);

    /// <summary>Samples [start, end) of a set as the cluster evaluates them: blocks of <see cref="Evaluation.Block"/>, added in order.</summary>
    public Evaluation Evaluate(Dataset data, int start, int end)
    {
        using var runner = new ChunkRunner(_spec.Model, _spec.ChunkSize);
        var result = Evaluation.Empty(_spec.Model.OutputSize);
        for (int from = start; from < end; from += Evaluation.Block)
            result = result.Add(runner.Evaluate(data, Parameters, from, Math.Min(end, from + Evaluation.Block)));
        return result;
    }

    public void Dispose() => _gradient.Dispose();
}
