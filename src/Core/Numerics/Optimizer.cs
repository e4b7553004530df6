using System.Numerics.Tensors;

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
/// One update of the flat parameter vector from a gradient sum over <c>count</c> samples.
/// SGD:      θ ← θ − lr · g
/// Momentum: v ← μ·v + g;  θ ← θ − lr · v      (PyTorch's SGD with momentum, dampening 0)
/// where g = gradientSum / count. Single passes over spans; no allocation.
/// </summary>
public static class Optimizer
{
    public static void Step(OptimizerSettings settings, Span<float> parameters, Span<float> gradientSum, int count, Span<float> velocity)
    {
        TensorPrimitives.Divide(gradientSum, count, gradientSum);
        switch (settings.Kind)
        {
            case OptimizerKind.Sgd:
                TensorPrimitives.MultiplyAdd(gradientSum, -settings.LearningRate, parameters, parameters);
                break;
            case OptimizerKind.Momentum:
                TensorPrimitives.MultiplyAdd(velocity, settings.Momentum, gradientSum, velocity);
                TensorPrimitives.MultiplyAdd(velocity, -settings.LearningRate, parameters, parameters);
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(settings));
        }
    }
}
