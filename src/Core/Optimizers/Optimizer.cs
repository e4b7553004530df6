namespace Backprop.Core.Numerics;

/// <summary>
/// An update rule and the state it keeps: <see cref="StateVectors"/> vectors the length of the parameters it
/// updates (momentum: 1, Adam: 2), held one after another in one flat array. The rule is element-wise, so a
/// parameter-server shard steps its slice with a <see cref="StateTile"/> of its own state and gets the same bits
/// as one server over the whole vector; and each element gets the same operations whatever its position (no
/// fused multiply-add), so the bits do not depend on the vector width either. The server, the checkpoints and
/// <see cref="Training.LocalTrainer"/> know only this type: a new optimizer is one new subclass and a case in <see cref="For"/>.
/// </summary>
public abstract class Optimizer
{
    /// <summary>
    /// The optimizer of <paramref name="settings"/> for a run of <paramref name="epochs"/> epochs of
    /// <paramref name="stepsPerEpoch"/> steps, which only a schedule that depends on the run's length needs
    /// (<see cref="OptimizerSettings.NeedsRunLength"/>; see <see cref="Training.RunSpec.Resolve"/>).
    /// </summary>
    public static Optimizer For(OptimizerSettings settings, int epochs = 0, int stepsPerEpoch = 0)
    {
        var s = settings;
        var schedule = new LearningRateSchedule(s, epochs, stepsPerEpoch);
        return s.Kind switch
        {
            OptimizerKind.Sgd => new Sgd(schedule, s.WeightDecay),
            OptimizerKind.Momentum => new Momentum(schedule, s.Momentum, nesterov: false, s.WeightDecay),
            OptimizerKind.Nesterov => new Momentum(schedule, s.Momentum, nesterov: true, s.WeightDecay),
            OptimizerKind.Adam => new Adam(schedule, s.Beta1, s.Beta2, s.Eps, s.WeightDecay, decoupled: false),
            OptimizerKind.AdamW => new Adam(schedule, s.Beta1, s.Beta2, s.Eps, s.WeightDecay, decoupled: true),
            _ => throw new ArgumentException($"optimizer: {(int)s.Kind} is not a known optimizer"),
        };
    }

    public abstract int StateVectors { get; }

    /// <summary>
    /// Step number <paramref name="step"/> (steps applied before it; schedules and bias corrections read it) of
    /// one tile: (θ, state) to (θ', state') from a gradient sum over <paramref name="count"/> samples. The outputs
    /// may be the inputs (in place) or spare buffers of the same shape (a caller that may have to drop the step);
    /// element i of the outputs is written after element i of the inputs is read.
    /// </summary>
    public abstract void Step(long step, ReadOnlySpan<float> parameters, ReadOnlySpan<float> gradientSum, int count, StateTile state,
        Span<float> parametersOut, StateTile stateOut);

    /// <summary>The whole vector in place; <paramref name="state"/> holds <see cref="StateVectors"/> × parameters.Length floats.</summary>
    public void Step(long step, Span<float> parameters, ReadOnlySpan<float> gradientSum, int count, float[] state)
    {
        var tile = new StateTile(state, parameters.Length, 0, parameters.Length);
        Step(step, parameters, gradientSum, count, tile, parameters, tile);
    }

    protected static void CheckLengths(ReadOnlySpan<float> parameters, ReadOnlySpan<float> gradientSum, Span<float> parametersOut)
    {
        if (gradientSum.Length != parameters.Length || parametersOut.Length != parameters.Length)
            throw new ArgumentException($"gradient ({gradientSum.Length}), parameters ({parameters.Length}) and output ({parametersOut.Length}) differ in length");
    }
}

/// <summary>
/// Entries [<c>start</c>, <c>start + count</c>) of each of the state vectors in a flat array of vectors of
/// <c>length</c> entries each: what a tile of the parameters needs of the optimizer's state.
/// </summary>
public readonly ref struct StateTile(Span<float> all, int length, int start, int count)
{
    private readonly Span<float> _all = all;

    public int Count => count;

    /// <summary>State vector <paramref name="k"/>'s entries for this tile.</summary>
    public Span<float> this[int k] => _all.Slice(checked(k * length + start), count);
}
