using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;

namespace Backprop.Grains.Messages;

// Core stays free of Orleans, so its types cross the wire through these surrogates.

[GenerateSerializer]
public struct RunSpecSurrogate
{
    [Id(0)] public int[] Layers;
    [Id(1)] public Activation Activation;
    [Id(2)] public Loss Loss;
    [Id(3)] public InitScheme Init;
    [Id(4)] public OptimizerKind Optimizer;
    /// <summary>The rate as versions before <see cref="LearningRateDouble"/> stored it; still written, rounded, for them.</summary>
    [Id(5)] public float LearningRate;
    [Id(6)] public float Momentum;
    [Id(7)] public int BatchSize;
    [Id(8)] public int ChunkSize;
    [Id(9)] public int Epochs;
    [Id(10)] public int Workers;
    [Id(11)] public long Seed;
    [Id(12)] public string Dataset;
    [Id(13)] public int TrainLimit;
    [Id(14)] public int CheckpointEvery;
    [Id(15)] public int ServerShards;
    // 16-29: the optimizer's other settings and its learning-rate schedule.
    [Id(16)] public double WeightDecay;
    [Id(17)] public double Beta1;
    [Id(18)] public double Beta2;
    [Id(19)] public double Eps;
    [Id(20)] public ScheduleKind Schedule;
    [Id(21)] public int LrStepEpochs;
    [Id(22)] public double LrGamma;
    [Id(23)] public double LrMin;
    [Id(24)] public int WarmupSteps;
    [Id(25)] public int StepsPerEpoch;
    [Id(26)] public double ClipNorm;
    /// <summary>The rate as a double (PyTorch's Python float); 0 in a record of an earlier version, which has <see cref="LearningRate"/> only.</summary>
    [Id(27)] public double LearningRateDouble;
    /// <summary>Whether <see cref="LrMin"/> was given: false in a record of an earlier version, whose lr-min 0 was meant (its default then).</summary>
    [Id(28)] public bool LrMinGiven;
    /// <summary>One-cycle as versions before PyTorch's fractional phase end: set for their records (<see cref="OptimizerSettings.RoundedOneCycle"/>).</summary>
    [Id(29)] public bool RoundedOneCycle;
    [Id(30)] public int Validation;
    [Id(31)] public int EarlyStop;
    [Id(32)] public bool KeepBest;
    [Id(33)] public string? Augment;
    /// <summary>The last images held out, as versions before the seeded draw did: set for their records (<see cref="RunSpec.ValidationLast"/>).</summary>
    [Id(34)] public bool ValidationLast;
}

[RegisterConverter]
public sealed class RunSpecConverter : IConverter<RunSpec, RunSpecSurrogate>
{
    public RunSpec ConvertFromSurrogate(in RunSpecSurrogate s) => new(
        new ModelSpec(s.Layers, s.Activation, s.Loss), s.Init, new OptimizerSettings(s.Optimizer, s.LearningRateDouble != 0 ? s.LearningRateDouble : s.LearningRate, s.Momentum, s.WeightDecay, s.Beta1, s.Beta2, s.Eps, s.Schedule, s.LrStepEpochs, s.LrGamma, LrMinOf(s), s.WarmupSteps,
            s.RoundedOneCycle || (Earlier(s) && s.Schedule == ScheduleKind.OneCycle)),
        s.BatchSize, s.ChunkSize, s.Epochs, s.Workers, s.Seed, s.Dataset, s.TrainLimit, s.CheckpointEvery, s.ServerShards, s.StepsPerEpoch,
        s.Validation, s.EarlyStop, s.KeepBest, s.Augment ?? RunSpec.NoAugment, s.ClipNorm, s.ValidationLast || (Earlier(s) && s.Validation > 0));

    /// <summary>
    /// A record of a version before the double rate (every later one writes <see cref="RunSpecSurrogate.LearningRateDouble"/>,
    /// a positive rate): its run keeps the semantics it started with.
    /// </summary>
    private static bool Earlier(in RunSpecSurrogate s) => s.LearningRateDouble == 0;

    /// <summary>An earlier version's record always holds lr-min (0 by default), and its runs ended there: it stays given.</summary>
    private static double? LrMinOf(in RunSpecSurrogate s) => s.LrMinGiven || Earlier(s) ? s.LrMin : null;

    public RunSpecSurrogate ConvertToSurrogate(in RunSpec v) => new()
    {
        Layers = v.Model.Layers, Activation = v.Model.Activation, Loss = v.Model.Loss, Init = v.Init,
        Optimizer = v.Optimizer.Kind, LearningRate = (float)v.Optimizer.LearningRate, LearningRateDouble = v.Optimizer.LearningRate, Momentum = v.Optimizer.Momentum,
        BatchSize = v.BatchSize, ChunkSize = v.ChunkSize, Epochs = v.Epochs, Workers = v.Workers, Seed = v.Seed,
        Dataset = v.Dataset, TrainLimit = v.TrainLimit, CheckpointEvery = v.CheckpointEvery, ServerShards = v.ServerShards,
        WeightDecay = v.Optimizer.WeightDecay, Beta1 = v.Optimizer.Beta1, Beta2 = v.Optimizer.Beta2, Eps = v.Optimizer.Eps,
        Schedule = v.Optimizer.Schedule, LrStepEpochs = v.Optimizer.LrStepEpochs, LrGamma = v.Optimizer.LrGamma, LrMin = v.Optimizer.LrMin ?? 0, LrMinGiven = v.Optimizer.LrMin is not null,
        WarmupSteps = v.Optimizer.WarmupSteps, RoundedOneCycle = v.Optimizer.RoundedOneCycle, StepsPerEpoch = v.StepsPerEpoch,
        Validation = v.Validation, EarlyStop = v.EarlyStop, KeepBest = v.KeepBest, Augment = v.Augment, ClipNorm = v.ClipNorm,
        ValidationLast = v.ValidationLast,
    };
}

[GenerateSerializer]
public struct ModelSpecSurrogate
{
    [Id(0)] public int[] Layers;
    [Id(1)] public Activation Activation;
    [Id(2)] public Loss Loss;
}

[RegisterConverter]
public sealed class ModelSpecConverter : IConverter<ModelSpec, ModelSpecSurrogate>
{
    public ModelSpec ConvertFromSurrogate(in ModelSpecSurrogate s) => new(s.Layers, s.Activation, s.Loss);
    public ModelSpecSurrogate ConvertToSurrogate(in ModelSpec v) => new() { Layers = v.Layers, Activation = v.Activation, Loss = v.Loss };
}

[GenerateSerializer]
public struct EvaluationSurrogate
{
    [Id(0)] public int Count;
    [Id(1)] public int Correct;
    [Id(2)] public double LossSum;
    [Id(3)] public int Classes;
    [Id(4)] public int[] Confusion;
}

[RegisterConverter]
public sealed class EvaluationConverter : IConverter<Evaluation, EvaluationSurrogate>
{
    public Evaluation ConvertFromSurrogate(in EvaluationSurrogate s) => new(s.Count, s.Correct, s.LossSum, s.Classes, s.Confusion);
    public EvaluationSurrogate ConvertToSurrogate(in Evaluation v) => new()
    {
        Count = v.Count, Correct = v.Correct, LossSum = v.LossSum, Classes = v.Classes, Confusion = v.Confusion,
    };
}
