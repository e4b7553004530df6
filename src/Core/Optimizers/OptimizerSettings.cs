namespace Backprop.Core.Numerics;

public enum OptimizerKind { Sgd, Momentum, Nesterov, Adam, AdamW }

public enum ScheduleKind { Constant, Step, Cosine, OneCycle }

/// <summary>
/// The optimizer of a run as the user chose it, and its learning-rate schedule; <see cref="Optimizer.For"/> makes the
/// one that steps. The hyperparameters that PyTorch keeps as Python floats (betas, eps, weight decay, the schedule's)
/// are doubles here, lr too, so that the per-step scalars are computed from the same values (each optimizer rounds them to
/// float where PyTorch's kernel does). <see cref="LrMin"/> null: the schedule's own end (cosine 0, one-cycle lr/25/1e4).
/// <see cref="RoundedOneCycle"/>: a run stored by a version before one-cycle followed PyTorch to the bit keeps the schedule
/// it started with (its peak at step round(0.3·T) − 1 or W − 1), so that it resumes with the same rates.
/// </summary>
public sealed record OptimizerSettings(
    OptimizerKind Kind,
    double LearningRate,
    float Momentum,
    double WeightDecay = 0,
    double Beta1 = 0.9,
    double Beta2 = 0.999,
    double Eps = 1e-8,
    ScheduleKind Schedule = ScheduleKind.Constant,
    int LrStepEpochs = 0,
    double LrGamma = 0.1,
    double? LrMin = null,
    int WarmupSteps = 0,
    bool RoundedOneCycle = false)
{
    /// <summary>Ranges only; what depends on the run's length is checked by <see cref="Training.RunSpec.Validate()"/>.</summary>
    public void Validate()
    {
        if (!Enum.IsDefined(Kind)) throw new ArgumentException($"optimizer: {(int)Kind} is not a known optimizer");
        if (!(LearningRate > 0) || double.IsInfinity(LearningRate))
            throw new ArgumentException($"lr: {LearningRate} is not a positive finite number");
        // The kernels take it as a float: past float's range it would be infinite there, below it 0 (no step at all).
        if (LearningRate is < float.Epsilon or > float.MaxValue)
            throw new ArgumentException($"lr: {LearningRate} is outside the range a float holds ({float.Epsilon:G2} .. {float.MaxValue:G2})");
        if (!(WeightDecay >= 0) || double.IsInfinity(WeightDecay))
            throw new ArgumentException($"weight-decay: {WeightDecay} is not a non-negative finite number");
        if (Kind is OptimizerKind.Momentum or OptimizerKind.Nesterov && !(Momentum >= 0 && Momentum < 1))
            throw new ArgumentException($"momentum: {Momentum} is outside [0, 1)");
        if (Kind == OptimizerKind.Nesterov && Momentum == 0)
            throw new ArgumentException("momentum: nesterov needs a momentum above 0");
        if (Kind is OptimizerKind.Adam or OptimizerKind.AdamW)
        {
            if (!(Beta1 >= 0 && Beta1 < 1)) throw new ArgumentException($"beta1: {Beta1} is outside [0, 1)");
            if (!(Beta2 >= 0 && Beta2 < 1)) throw new ArgumentException($"beta2: {Beta2} is outside [0, 1)");
            if (!(Eps > 0) || double.IsInfinity(Eps)) throw new ArgumentException($"eps: {Eps} is not a positive finite number");
        }
        if (!Enum.IsDefined(Schedule)) throw new ArgumentException($"lr-schedule: {(int)Schedule} is not a known schedule");
        if (WarmupSteps < 0) throw new ArgumentException($"warmup-steps: {WarmupSteps} is negative");
        if (Schedule == ScheduleKind.Step)
        {
            if (LrStepEpochs < 1) throw new ArgumentException($"lr-step-epochs: {LrStepEpochs} is not a positive number of epochs");
            if (!(LrGamma > 0) || double.IsInfinity(LrGamma)) throw new ArgumentException($"lr-gamma: {LrGamma} is not a positive finite number");
        }
        if (Schedule is ScheduleKind.Cosine or ScheduleKind.OneCycle && LrMin is { } min && !(min >= 0 && min <= LearningRate))
            throw new ArgumentException($"lr-min: {min} is outside [0, lr {LearningRate}]");
        // PyTorch divides by the first phase's length, float(pct_start · total) − 1, which is 0 for one step.
        if (Schedule == ScheduleKind.OneCycle && WarmupSteps == 1 && !RoundedOneCycle)
            throw new ArgumentException("warmup-steps: one-cycle needs a rising phase of at least 2 steps (or 0 for 30% of the run)");
    }

    /// <summary>The rate at a cosine or one-cycle schedule's last step: lr-min, else 0 (cosine) or PyTorch's min_lr = (lr / div_factor) / final_div_factor.</summary>
    public double LrEnd => LrMin ?? (Schedule == ScheduleKind.OneCycle ? LearningRate / 25.0 / 1e4 : 0);

    /// <summary>Whether the rate depends on the run's length (steps per epoch, total steps), so that the run must resolve it at its start.</summary>
    public bool NeedsRunLength => Schedule != ScheduleKind.Constant || WarmupSteps > 0;

    /// <summary>The schedule's demands on a run of <paramref name="epochs"/> epochs of <paramref name="stepsPerEpoch"/> steps (0: not known yet).</summary>
    public void ValidateLength(int epochs, int stepsPerEpoch)
    {
        long total = (long)epochs * stepsPerEpoch;
        if (stepsPerEpoch > 0 && WarmupSteps > 0 && WarmupSteps >= total)
            throw new ArgumentException($"warmup-steps: {WarmupSteps} is not below the run's {total} steps ({epochs} epochs of {stepsPerEpoch})");
        if (Schedule == ScheduleKind.Step && LrStepEpochs >= epochs)
            throw new ArgumentException($"lr-step-epochs: {LrStepEpochs} is not below the run's {epochs} epochs: the rate would never change");
    }
}
