using System.Numerics;

namespace Backprop.Core.Numerics;

/// <summary>Plain SGD: θ ← θ − lr · g, with g = gradientSum / count. No state.</summary>
public sealed class Sgd(float learningRate) : Optimizer
{
    public override int StateVectors => 0;

    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    public override void Step(long step, ReadOnlySpan<float> parameters, ReadOnlySpan<float> gradientSum, int count, StateTile state,
        Span<float> parametersOut, StateTile stateOut)
    {
        CheckLengths(parameters, gradientSum, parametersOut);
        float lr = learningRate, n = count;
        int i = 0, w = Vector<float>.Count;
        var vlr = new Vector<float>(lr);
        var vn = new Vector<float>(n);
        for (; i + w <= parameters.Length; i += w)
        {
            var g = new Vector<float>(gradientSum.Slice(i)) / vn;
            (new Vector<float>(parameters.Slice(i)) - vlr * g).CopyTo(parametersOut.Slice(i));
        }
        for (; i < parameters.Length; i++) parametersOut[i] = parameters[i] - lr * (gradientSum[i] / n);
    }
}
