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

    private static EarlierRunSpecSurrogate Earlier(int epochs, int stepsPerEpoch, int warmup = 0, int validation = 0) => new()
    {
        Layers = [784, 30, 10], Activation = Activation.Relu, Loss = Loss.CrossEntropy, Init = InitScheme.PyTorch,
        Optimizer = OptimizerKind.AdamW, LearningRate = 0.002f, WeightDecay = 0.01, Beta1 = 0.9, Beta2 = 0.999, Eps = 1e-8,
        Schedule = ScheduleKind.OneCycle, LrGamma = 0.1, LrMin = 0, WarmupSteps = warmup, BatchSize = 128, ChunkSize = 32,
        Epochs = epochs, Workers = 4, Seed = 1, Dataset = "mnist", CheckpointEvery = 100, ServerShards = 2, StepsPerEpoch = stepsPerEpoch,
        Validation = validation, Augment = "none",
    };

    /// <summary>The one-cycle rate as the earlier version computed it: its peak at step round(0.3·T) − 1 (or W − 1), clamped.</summary>
    private static double EarlierOneCycle(double lr, long total, int warmup, long t)
    {
        static double Anneal(double start, double end, double p) => end + (start - end) / 2.0 * (Math.Cos(Math.PI * Math.Min(1, p)) + 1);
        long peak = Math.Max(1, warmup > 0 ? warmup : (long)Math.Round(0.3 * total)) - 1;
        return t <= peak ? Anneal(lr / 25, lr, peak == 0 ? 1 : t / (double)peak) : Anneal(lr, 0, (t - peak) / (double)Math.Max(1, total - 1 - peak));
    }

    [Theory]
    [InlineData(6, 469, 0)]   // the earlier fast-98: 2,814 steps, 2,812 of them at other rates under PyTorch's fractional phase end
    [InlineData(2, 11, 15)]
    [InlineData(2, 11, 1)]    // a one-step rise, which PyTorch's formula cannot take: refused for new runs, kept for old ones
    public void A_one_cycle_run_stored_by_an_earlier_version_resumes_with_the_rates_it_started_with(int epochs, int stepsPerEpoch, int warmup)
    {
        var spec = Serializer.Deserialize<RunSpec>(Serializer.SerializeToArray(Earlier(epochs, stepsPerEpoch, warmup)))!;
        Assert.True(spec.Optimizer.RoundedOneCycle);
        spec.Validate();
        // The coordinator sends the spec on to shards and workers, which read it as this version wrote it: still rounded.
        var sent = Serializer.Deserialize<RunSpec>(Serializer.SerializeToArray(spec))!;
        Assert.Equal(spec, sent with { Model = spec.Model });
        long total = (long)epochs * stepsPerEpoch;
        var schedule = new LearningRateSchedule(sent.Optimizer, epochs, stepsPerEpoch);
        for (long t = 0; t < total; t++)
            Assert.Equal(EarlierOneCycle((double)0.002f, total, warmup, t), schedule.At(t));
        // A new run's one-cycle is PyTorch's, and differs (warm-up 1 is refused for it).
        if (warmup != 1)
        {
            var pytorch = new LearningRateSchedule(sent.Optimizer with { RoundedOneCycle = false }, epochs, stepsPerEpoch);
            Assert.Contains(Enumerable.Range(1, (int)total - 2), t => pytorch.At(t) != schedule.At(t));
        }
    }

    [Fact]
    public void A_run_stored_by_an_earlier_version_with_validation_keeps_the_last_images_held_out()
    {
        var spec = Serializer.Deserialize<RunSpec>(Serializer.SerializeToArray(Earlier(2, 11, validation: 90)))!;
        Assert.True(spec.ValidationLast);
        var sent = Serializer.Deserialize<RunSpec>(Serializer.SerializeToArray(spec))!;
        Assert.True(sent.ValidationLast);
        var data = Backprop.Core.Data.SyntheticDigits.Create(trainCount: 1000, testCount: 10, seed: 3).Train;
        var (train, validation) = sent.Split(data);
        Assert.Equal(data.Take(910).Labels.ToArray(), train.Labels.ToArray());
        Assert.Equal(data.Labels.ToArray()[910..], validation.Labels.ToArray());
        // A new run draws them from its seed instead.
        var (_, drawn) = (sent with { ValidationLast = false }).Split(data);
        Assert.NotEqual(validation.Labels.ToArray(), drawn.Labels.ToArray());
        // A record without validation is not marked.
        Assert.False(Serializer.Deserialize<RunSpec>(Serializer.SerializeToArray(Earlier(2, 11)))!.ValidationLast);
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
