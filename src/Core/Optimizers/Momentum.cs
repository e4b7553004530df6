using System.Numerics;

namespace Backprop.Core.Numerics;

/// <summary>
/// SGD with momentum as torch.optim.SGD writes it (dampening 0): g = gradientSum / count; g ← g + wd·θ when weight
/// decay is on; v ← μ·v + g; θ ← θ − lr·v, or with Nesterov θ ← θ − lr·(g + μ·v). State: the velocity v (PyTorch
/// starts it at g, which is μ·0 + g).
/// </summary>
public sealed class Momentum(LearningRateSchedule schedule, float momentum, bool nesterov = false, double weightDecay = 0) : Optimizer
{
    public override int StateVectors => 1;

    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    public override void Step(long step, ReadOnlySpan<float> parameters, ReadOnlySpan<float> gradientSum, int count, StateTile state,
        Span<float> parametersOut, StateTile stateOut)
    {
        CheckLengths(parameters, gradientSum, parametersOut);
        Span<float> velocity = state[0], velocityOut = stateOut[0];
        if (velocity.Length != parameters.Length || velocityOut.Length != parameters.Length)
            throw new ArgumentException("velocity and parameters differ in length");
        float lr = (float)schedule.At(step), mu = momentum, n = count, wd = (float)weightDecay;
        bool decay = weightDecay != 0;
        int i = 0, w = Vector<float>.Count;
        var vlr = new Vector<float>(lr);
        var vmu = new Vector<float>(mu);
        var vn = new Vector<float>(n);
        var vwd = new Vector<float>(wd);
        for (; i + w <= parameters.Length; i += w)
        {
            var p = new Vector<float>(parameters.Slice(i));
            var g = new Vector<float>(gradientSum.Slice(i)) / vn;
            if (decay) g += vwd * p;
            var v = vmu * new Vector<float>(velocity.Slice(i)) + g;
            v.CopyTo(velocityOut.Slice(i));
            (p - vlr * (nesterov ? g + vmu * v : v)).CopyTo(parametersOut.Slice(i));
        }
        for (; i < parameters.Length; i++)
        {
            float p = parameters[i], g = gradientSum[i] / n;
            if (decay) g += wd * p;
            float v = mu * velocity[i] + g;
            velocityOut[i] = v;
            parametersOut[i] = p - lr * (nesterov ? g + mu * v : v);
        }
    }
}
