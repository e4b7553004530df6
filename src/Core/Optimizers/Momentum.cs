using System.Numerics;

namespace Backprop.Core.Numerics;

/// <summary>
/// SGD with momentum as PyTorch writes it (dampening 0): v ← μ·v + g;  θ ← θ − lr · v, with g = gradientSum / count.
/// State: the velocity v.
/// </summary>
public sealed class Momentum(float learningRate, float momentum) : Optimizer
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
        float lr = learningRate, mu = momentum, n = count;
        int i = 0, w = Vector<float>.Count;
        var vlr = new Vector<float>(lr);
        var vmu = new Vector<float>(mu);
        var vn = new Vector<float>(n);
        for (; i + w <= parameters.Length; i += w)
        {
            var v = vmu * new Vector<float>(velocity.Slice(i)) + new Vector<float>(gradientSum.Slice(i)) / vn;
            v.CopyTo(velocityOut.Slice(i));
            (new Vector<float>(parameters.Slice(i)) - vlr * v).CopyTo(parametersOut.Slice(i));
        }
        for (; i < parameters.Length; i++)
        {
            float v = mu * velocity[i] + gradientSum[i] / n;
            velocityOut[i] = v;
            parametersOut[i] = parameters[i] - lr * v;
        }
    }
}
