namespace Backprop.Core.Numerics;

/// <summary>
/// The learning rate of global step t (steps applied before it), a pure function of t and the run's length, so that
/// every shard, every worker count and every resume computes the same rate. In double, as PyTorch's schedulers do;
/// the optimizers round it to float where PyTorch does.
/// <list type="bullet">
/// <item>constant: lr.</item>
/// <item>step: lr · γ^⌊epoch / lr-step-epochs⌋ (PyTorch's StepLR stepped once an epoch).</item>
/// <item>cosine: after the warm-up, from lr down to lr-min at the last step: lr-min + (lr − lr-min)(1 + cos πp)/2.</item>
/// <item>one-cycle: PyTorch's OneCycleLR (two phases, cosine annealing), pct_start = W/T (W = warm-up steps) or 0.3,
/// div_factor 25, final_div_factor 1e4 unless lr-min is given; its momentum is not cycled.</item>
/// </list>
/// A linear warm-up of W steps multiplies constant and step schedules by (t + 1)/W for t &lt; W; cosine starts after it.
/// </summary>
public sealed class LearningRateSchedule
{
    private readonly OptimizerSettings _s;
    private readonly int _stepsPerEpoch;
    private readonly long _total;

    public LearningRateSchedule(OptimizerSettings settings, int epochs, int stepsPerEpoch)
    {
        _s = settings;
        if (settings.NeedsRunLength && (epochs < 1 || stepsPerEpoch < 1))
            throw new ArgumentException($"lr-schedule: {settings.Schedule.ToString().ToLowerInvariant()} with warm-up {settings.WarmupSteps} needs the run's length, resolved when it starts");
        settings.ValidateLength(epochs, stepsPerEpoch);
        (_stepsPerEpoch, _total) = (stepsPerEpoch, (long)epochs * stepsPerEpoch);
    }

    public double At(long step)
    {
        double lr = _s.LearningRate;
        int warmup = _s.WarmupSteps;
        double warm = step < warmup ? (step + 1) / (double)warmup : 1;
        switch (_s.Schedule)
        {
            case ScheduleKind.Step:
                // γ^k by repeated multiplication: the same bits on every platform, unlike Math.Pow.
                long decays = step / _stepsPerEpoch / _s.LrStepEpochs;
                for (long k = 0; k < decays; k++) lr *= _s.LrGamma;
                return lr * warm;
            case ScheduleKind.Cosine:
                if (step < warmup) return lr * warm;
                return Anneal(lr, _s.LrEnd, (step - warmup) / (double)Math.Max(1, _total - 1 - warmup));
            case ScheduleKind.OneCycle when _s.RoundedOneCycle:
                // As versions before PyTorch's fractional phase end computed it, for the runs they stored.
                long rounded = Math.Max(1, warmup > 0 ? warmup : (long)Math.Round(0.3 * _total)) - 1;
                return step <= rounded
                    ? Clamped(lr / 25, lr, rounded == 0 ? 1 : step / (double)rounded)
                    : Clamped(lr, _s.LrEnd, (step - rounded) / (double)Math.Max(1, _total - 1 - rounded));
            case ScheduleKind.OneCycle:
                // As OneCycleLR.get_lr: phase one ends at float(pct_start · total) − 1, a fraction in general; phase two at
                // total − 1 at its min_lr (LrEnd).
                double pctStart = warmup > 0 ? warmup / (double)_total : 0.3;
                double initial = lr / 25.0, peak = pctStart * _total - 1, last = _total - 1;
                return step <= peak
                    ? Anneal(initial, lr, step / peak)
                    : Anneal(lr, _s.LrEnd, (step - peak) / (last - peak));
            default:
                return lr * warm;
        }
    }

    /// <summary>PyTorch's _annealing_cos: from <paramref name="start"/> at p = 0 to <paramref name="end"/> at p = 1.</summary>
    private static double Anneal(double start, double end, double p) => end + (start - end) / 2.0 * (Math.Cos(Math.PI * p) + 1);

    private static double Clamped(double start, double end, double p) => Anneal(start, end, Math.Min(1, p));
}
