using Backprop.Core.Model;
using Backprop.Core.Training;

namespace Backprop.Tests.Core;

/// <summary>The embedded CLI's warm-up: it builds a trainer for every kind of run the CLI starts, and skips what would cost more than it saves.</summary>
public sealed class WarmupTests
{
    public static TheoryData<string> Presets => ["nielsen", "pytorch-mlp", "fast-98"];

    [Theory]
    [MemberData(nameof(Presets))]
    public void Every_preset_warms_up(string preset)
    {
        var spec = Backprop.Core.Training.Presets.Get(preset);
        Assert.True(Warmup.Run(spec, threads: 1));
        Assert.True(Warmup.Run(spec with { ClipNorm = 0.5, Validation = 100, EarlyStop = 2, Augment = RunSpec.Shift2, TrainLimit = 500 }, threads: 2));
    }

    [Fact]
    public void A_model_too_large_to_be_worth_it_is_skipped()
    {
        var spec = Backprop.Core.Training.Presets.PyTorchMlp with { Model = new ModelSpec([784, 4096, 4096, 10], Activation.Relu, Loss.CrossEntropy) };
        Assert.False(Warmup.Run(spec, threads: 1));
    }
}
