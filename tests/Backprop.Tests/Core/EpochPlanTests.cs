using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;

namespace Backprop.Tests.Core;

public class EpochPlanTests
{
    [Fact]
    public void Permutation_is_a_permutation_fixed_by_seed_and_epoch()
    {
        var a = EpochPlan.Permutation(1000, 7, 0);
        Assert.Equal(Enumerable.Range(0, 1000), a.Order());
        Assert.Equal(a, EpochPlan.Permutation(1000, 7, 0));
        Assert.NotEqual(a, EpochPlan.Permutation(1000, 7, 1));
        Assert.NotEqual(a, EpochPlan.Permutation(1000, 8, 0));
    }

    [Fact]
    public void Steps_and_chunks_cover_every_sample_once_including_a_short_last_step()
    {
        var plan = new EpochPlan(sampleCount: 103, batchSize: 10, chunkSize: 4, seed: 1, epoch: 2);
        Assert.Equal(11, plan.Steps);
        Assert.Equal(3, plan.StepSize(10));
        Assert.Equal(3, plan.ChunkCount(0));
        Assert.Equal(1, plan.ChunkCount(10));
        var seen = new List<int>();
        for (int s = 0; s < plan.Steps; s++)
            for (int c = 0; c < plan.ChunkCount(s); c++)
                seen.AddRange(plan.Chunk(s, c).ToArray());
        Assert.Equal(EpochPlan.Permutation(103, 1, 2), seen);
    }

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
