using Backprop.Core.Data;
using Backprop.Core.Numerics;
using Backprop.Core.Training;

namespace Backprop.Tests.Core;

public class GradientClipTests
{
    private static float[] RandomVector(int length, int seed)
    {
        var rng = new Random(seed);
        // Magnitudes over six decades: float addition in another order would change the last bits.
        return Enumerable.Range(0, length).Select(_ => (float)((rng.NextDouble() - 0.5) * Math.Pow(10, rng.Next(-3, 3)))).ToArray();
    }

    [Theory]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(7)]
    public void The_norm_over_shards_is_the_bits_of_the_norm_over_the_whole_vector(int shards)
    {
        const int length = 109_386;   // pytorch-mlp's parameters: not a multiple of the tile
        var gradient = RandomVector(length, seed: shards);
        var whole = new double[GradientClip.Tiles(length)];
        GradientClip.SquaredSums(gradient, whole);
        double expected = GradientClip.Total(whole);

        var layout = new ShardLayout(length, shards, GradientClip.Tile);
        layout.Validate();
        var parts = new List<double[]>();
        for (int j = 0; j < shards; j++)
        {
            Assert.Equal(0, layout.Start(j) % GradientClip.Tile);
            var sums = new double[GradientClip.Tiles(layout.Length(j))];
            GradientClip.SquaredSums(gradient.AsSpan(layout.Start(j), layout.Length(j)), sums);
            parts.Add(sums);
        }
        Assert.Equal(whole, parts.SelectMany(p => p).ToArray());
        // What shard 0 computes from the shards' parts: the bits of the whole vector's total.
        Assert.Equal(BitConverter.DoubleToInt64Bits(expected), BitConverter.DoubleToInt64Bits(GradientClip.Total(parts)));
        // And it is the squared norm: against a sum in decimal.
        decimal exact = gradient.Aggregate(0m, (sum, g) => sum + (decimal)((double)g * g));
        Assert.Equal((double)exact, expected, (double)exact * 1e-12);
    }

    [Fact]
    public void A_non_finite_entry_makes_its_tile_and_the_total_non_finite()
    {
        var gradient = RandomVector(3000, seed: 1);
        gradient[2500] = float.NaN;
        var sums = new double[3];
        GradientClip.SquaredSums(gradient, sums);
        Assert.True(double.IsFinite(sums[0]) && double.IsFinite(sums[1]));
        Assert.False(double.IsFinite(sums[2]));
        Assert.False(double.IsFinite(GradientClip.Total(sums)));
    }

    [Fact]
    public void The_scale_is_clip_grad_norms_coefficient_of_the_mean_gradient()
    {
        // A gradient sum of norm 10 over 2 samples: the mean's norm is 5.
        Assert.Equal((float)(1.0 / (5 + 1e-6)), GradientClip.Scale(100, count: 2, maxNorm: 1));
        Assert.Equal((float)(4.0 / (5 + 1e-6)), GradientClip.Scale(100, count: 2, maxNorm: 4));
        // As PyTorch: at the bound the eps still scales by a hair; well over it nothing changes, exactly.
        Assert.Equal((float)(5.0 / (5 + 1e-6)), GradientClip.Scale(100, count: 2, maxNorm: 5));
        Assert.Equal(1f, GradientClip.Scale(100, count: 2, maxNorm: 50));
        Assert.Equal(1f, GradientClip.Scale(0, count: 2, maxNorm: 1));
    }

    private static RunSpec Sgd(double clip) => Presets.PyTorchMlp with
    {
        Optimizer = new OptimizerSettings(OptimizerKind.Sgd, 0.1f, 0),
        ClipNorm = clip, Epochs = 1, Seed = 5,
    };

    [Fact]
    public void A_clipped_sgd_step_moves_the_parameters_by_the_rate_times_the_max_norm()
    {
        var data = SyntheticDigits.Create(640, 10, seed: 3);
        float[] Step(double clip)
        {
            using var trainer = new LocalTrainer(Sgd(clip), data.Train);
            trainer.TrainEpoch(0, maxSteps: 1);
            return trainer.Parameters;
        }
        var initial = Backprop.Core.Model.Initializer.Create(Sgd(0).Model, Sgd(0).Init, Sgd(0).Seed);
        double Moved(float[] after) => Math.Sqrt(after.Zip(initial).Sum(p => ((double)p.First - p.Second) * ((double)p.First - p.Second)));

        // Plain SGD moves by lr·‖mean gradient‖; clipped to 0.01 by lr·0.01 (to float rounding).
        double unclipped = Moved(Step(0));
        Assert.True(unclipped > 0.1 * 0.01 * 10, $"the first step's gradient norm is {unclipped / 0.1}: too small for this test");
        Assert.Equal(0.1 * 0.01, Moved(Step(0.01)), 0.1 * 0.01 * 1e-3);
        // A bound over the norm changes no bit.
        Assert.Equal(Step(0), Step(1e9));
    }

    [Fact]
    public void Clipping_is_checked_and_cuts_the_server_on_norm_tiles()
    {
        Assert.Contains("clip-norm: -1 is not a non-negative finite number", Assert.Throws<ArgumentException>(() => Sgd(-1).Validate()).Message);
        Assert.Contains("clip-norm: NaN", Assert.Throws<ArgumentException>(() => Sgd(double.NaN).Validate()).Message);
        Assert.Equal(ShardLayout.CacheLine, (Sgd(0) with { ServerShards = 3 }).Shards.Align);
        var clipped = (Sgd(1) with { ServerShards = 3 }).Shards;
        Assert.All(Enumerable.Range(0, 3), j => Assert.Equal(0, clipped.Start(j) % GradientClip.Tile));
        // 109,386 parameters are 107 tiles: 108 shards would leave one empty.
        Assert.Contains("leave shard", Assert.Throws<ArgumentException>(() => (Sgd(1) with { ServerShards = 108 }).Validate()).Message);
    }
}
