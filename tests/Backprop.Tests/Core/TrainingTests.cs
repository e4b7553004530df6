using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Training;

namespace Backprop.Tests.Core;

public class TrainingTests
{
    [Fact]
    public void Local_training_learns_synthetic_digits()
    {
        var data = SyntheticDigits.Create(2000, 500, seed: 11);
        var spec = Presets.PyTorchMlp with { Epochs = 1 };
        var trainer = new LocalTrainer(spec, data.Train);
        double first = trainer.TrainEpoch(0);
        double second = trainer.TrainEpoch(1);
        var eval = new ChunkRunner(spec.Model, 64).Evaluate(data.Test, trainer.Parameters, 0, data.Test.Count);
        Assert.True(second < first, $"training cost did not fall: {first} then {second}");
        // Chance is 10%. Two epochs over 2,000 samples reach about 85% here; 75% is far above chance
        // and leaves room, and a broken gradient or step stays near 10%.
        Assert.True(eval.Accuracy > 0.75, $"accuracy {eval.Accuracy}");
        Assert.Equal(500, Enumerable.Range(0, 10).Sum(a => Enumerable.Range(0, 10).Sum(p => eval.ConfusionAt(a, p))));
    }

    [Fact]
    public void Initialisation_is_deterministic_and_follows_the_scheme()
    {
        var spec = new ModelSpec([784, 30, 10], Activation.Sigmoid, Loss.Quadratic);
        var a = Initializer.Create(spec, InitScheme.Normal, 1);
        Assert.Equal(a, Initializer.Create(spec, InitScheme.Normal, 1));
        double mean = a.Average(v => (double)v), var = a.Average(v => (v - mean) * (v - mean));
        Assert.InRange(mean, -0.02, 0.02);
        Assert.InRange(var, 0.95, 1.05);
        var torch = Initializer.Create(spec, InitScheme.PyTorch, 1);
        var layout = new ParameterLayout(spec);
        float bound = 1f / MathF.Sqrt(784);
        Assert.All(layout.W(torch.AsSpan(), 0).ToArray(), w => Assert.InRange(w, -bound, bound));
    }
}
