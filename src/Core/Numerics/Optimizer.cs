using System.Numerics;

namespace Backprop.Core.Numerics;

public enum OptimizerKind { Sgd, Momentum }

public sealed record OptimizerSettings(OptimizerKind Kind, float LearningRate, float Momentum)
{
    public void Validate()
    {
        if (!(LearningRate > 0) || float.IsInfinity(LearningRate))
            throw new ArgumentException($"lr: {LearningRate} is not a positive finite number");
        if (Kind == OptimizerKind.Momentum && !(Momentum >= 0 && Momentum < 1))
            throw new ArgumentException($"momentum: {Momentum} is outside [0, 1)");
    }
}

/// <summary>
/// One update of the flat parameter vector from a gradient sum over <c>count</c> samples, in one pass:
/// SGD:      θ ← θ − lr · g
/// Momentum: v ← μ·v + g;  θ ← θ − lr · v      (PyTorch's SGD with momentum, dampening 0)
/// where g = gradientSum / count. Each element gets the same operations whatever its position (no fused
/// multiply-add), so the result does not depend on vector width.
/// </summary>
public static class Optimizer
{
    public static void Step(OptimizerSettings settings, Span<float> parameters, ReadOnlySpan<float> gradientSum, int count, Span<float> velocity) =>
        Step(settings, parameters, gradientSum, count, velocity, parameters, velocity);

    /// <summary>
    /// The same update from (θ, v) into (θ', v'), which may be the same spans or others of the same length: a caller
    /// that must be able to drop the step (a non-finite gradient found while it runs) writes into spare buffers.
    /// Element i of the outputs is written after element i of the inputs is read, so in place is safe.
    /// </summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    public static void Step(OptimizerSettings settings, ReadOnlySpan<float> parameters, ReadOnlySpan<float> gradientSum, int count,
        ReadOnlySpan<float> velocity, Span<float> parametersOut, Span<float> velocityOut)
    {
        if (gradientSum.Length != parameters.Length || parametersOut.Length != parameters.Length)
            throw new ArgumentException("gradient and parameters differ in length");
        float lr = settings.LearningRate, mu = settings.Momentum, n = count;
        int i = 0, w = Vector<float>.Count;
        if (settings.Kind == OptimizerKind.Sgd)
        {
            var vlr = new Vector<float>(lr);
            var vn = new Vector<float>(n);
            for (; i + w <= parameters.Length; i += w)
            {
                var g = new Vector<float>(gradientSum.Slice(i)) / vn;
                (new Vector<float>(parameters.Slice(i)) - vlr * g).CopyTo(parametersOut.Slice(i));
            }
            for (; i < parameters.Length; i++) parametersOut[i] = parameters[i] - lr * (gradientSum[i] / n);
        }
        else
        {
            if (velocity.Length != parameters.Length || velocityOut.Length != parameters.Length)
                throw new ArgumentException("velocity and parameters differ in length");
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
}
