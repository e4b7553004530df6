using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using Backprop.Grains.Messages;
using Microsoft.Extensions.DependencyInjection;
using Orleans.Serialization;

namespace Backprop.Tests.Cluster;

/// <summary>
/// The spec as Orleans' serializer stores it in a run's record: the learning rate as a double, and records of earlier
/// versions (a float rate at Id 5 only, lr-min always given) still read, so that their runs resume.
/// </summary>
public sealed class RunSpecWireTests
{
    private static readonly Serializer Serializer = new ServiceCollection().AddSerializer(b => b.AddAssembly(typeof(RunSpecWireTests).Assembly))
        .BuildServiceProvider().GetRequiredService<Serializer>();

    [Fact]
    public void The_learning_rate_travels_as_a_double_and_an_unset_lr_min_stays_unset()
    {
        var spec = Presets.Fast98 with { Optimizer = Presets.Fast98.Optimizer with { LearningRate = 0.1 } };
        var back = Serializer.Deserialize<RunSpec>(Serializer.SerializeToArray(spec))!;
        Assert.Equal(0.1, back.Optimizer.LearningRate);
        Assert.NotEqual((double)0.1f, back.Optimizer.LearningRate);
        Assert.Null(back.Optimizer.LrMin);
        Assert.Equal(spec, back with { Model = spec.Model });
        var given = spec with { Optimizer = spec.Optimizer with { LrMin = 0 } };
        Assert.Equal(0, Serializer.Deserialize<RunSpec>(Serializer.SerializeToArray(given))!.Optimizer.LrMin);
    }

    [Fact]
    public void A_spec_stored_by_an_earlier_version_reads_with_its_float_rate_and_its_lr_min()
    {
        var old = new EarlierRunSpecSurrogate
        {
            Layers = [784, 512, 10], Activation = Activation.Relu, Loss = Loss.CrossEntropy, Init = InitScheme.PyTorch,
            Optimizer = OptimizerKind.AdamW, LearningRate = 0.002f, WeightDecay = 0.01, Beta1 = 0.9, Beta2 = 0.999, Eps = 1e-8,
            Schedule = ScheduleKind.OneCycle, LrGamma = 0.1, LrMin = 0, BatchSize = 128, ChunkSize = 32, Epochs = 6, Workers = 4,
            Seed = 1, Dataset = "mnist", CheckpointEvery = 100, ServerShards = 2, StepsPerEpoch = 469, Augment = "shift2",
        };
        var spec = Serializer.Deserialize<RunSpec>(Serializer.SerializeToArray(old))!;
        Assert.Equal((double)0.002f, spec.Optimizer.LearningRate);
        Assert.Equal(0, spec.Optimizer.LrMin);   // the end its run had then, not the new default lr/25/1e4
        Assert.Equal(0, spec.Optimizer.LrEnd);
        Assert.Equal((OptimizerKind.AdamW, ScheduleKind.OneCycle, 469, 2, "shift2"),
            (spec.Optimizer.Kind, spec.Optimizer.Schedule, spec.StepsPerEpoch, spec.ServerShards, spec.Augment));
        Assert.Equal([784, 512, 10], spec.Model.Layers);
        spec.Validate();
    }
}

/// <summary>RunSpecSurrogate as versions before the double learning rate (Id 27) and lr-min's flag (Id 28) wrote it.</summary>
[GenerateSerializer]
public struct EarlierRunSpecSurrogate
{
    [Id(0)] public int[] Layers;
    [Id(1)] public Activation Activation;
    [Id(2)] public Loss Loss;
    [Id(3)] public InitScheme Init;
    [Id(4)] public OptimizerKind Optimizer;
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
    [Id(30)] public int Validation;
    [Id(31)] public int EarlyStop;
    [Id(32)] public bool KeepBest;
    [Id(33)] public string? Augment;
}
