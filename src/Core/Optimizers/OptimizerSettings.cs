namespace Backprop.Core.Numerics;

public enum OptimizerKind { Sgd, Momentum }

/// <summary>The optimizer of a run as the user chose it; <see cref="Optimizer.For"/> makes the one that steps.</summary>
public sealed record OptimizerSettings(OptimizerKind Kind, float LearningRate, float Momentum)
{
    public void Validate()
    {
        if (!Enum.IsDefined(Kind)) throw new ArgumentException($"optimizer: {(int)Kind} is not a known optimizer");
        if (!(LearningRate > 0) || float.IsInfinity(LearningRate))
            throw new ArgumentException($"lr: {LearningRate} is not a positive finite number");
        if (Kind == OptimizerKind.Momentum && !(Momentum >= 0 && Momentum < 1))
            throw new ArgumentException($"momentum: {Momentum} is outside [0, 1)");
    }
}
