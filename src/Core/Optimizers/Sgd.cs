using System.Numerics;

namespace Backprop.Core.Numerics;

/// <summary>
/// Plain SGD as torch.optim.SGD (no momentum): g = gradientSum / count; g ← g + wd·θ when weight decay is on;
/// θ ← θ − lr·g. No state.
/// </summary>
public sealed class Sgd(LearningRateSchedule schedule, double weightDecay = 0) : Optimizer
{
    public override int StateVectors => 0;

    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    public override void Step(long step, ReadOnlySpan<float> parameters, ReadOnlySpan<float> gradientSum, int count, StateTile state,
        Span<float> parametersOut, StateTile stateOut)
    {
        CheckLengths(parameters, gradientSum, parametersOut);
        float lr = (float)schedule.At(step), n = count, wd = (float)weightDecay;
        bool decay = weightDecay != 0;
        int i = 0, w = Vector<float>.Count;
        var vlr = new Vector<float>(lr);
        var vn = new Vector<float>(n);
        var vwd = new Vector<float>(wd);
        for (; i + w <= parameters.Length; i += w)
        {
            var p = new Vector<float>(parameters.Slice(i));
            var g = new Vector<float>(gradientSum.Slice(i)) / vn;
            if (decay) g += vwd * p;
            (p - vlr * g).CopyTo(parametersOut.Slice(i));
        }
        for (; i < parameters.Length; i++)
        {
            float p = parameters[i], g = gradientSum[i] / n;
            if (decay) g += wd * p;
            parametersOut[i] = p - lr * g;
        }
    }
}
