using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core;
using Backprop.Core.Numerics;
using Backprop.Core.Training;

namespace Backprop.Tests.Core;

/// <summary>
/// The step loop that LocalTrainer and the workers share: the versions and sample counts it hands out, where it stops,
/// and that a step assembled from its blocks through a target of one's own is LocalTrainer's step to the bit.
/// </summary>
public sealed class StepLoopTests
{
    private static readonly TrainTest Data = SyntheticDigits.Create(trainCount: 300, testCount: 10, seed: 4);

    /// <summary>Steps with a plain SGD update over the whole sum, from the blocks the loop gives it.</summary>
    private sealed class Recording(float[] parameters, Optimizer optimizer, int stopAfter = int.MaxValue) : IStepTarget
    {
        public float[] Parameters => parameters;
        public List<StepStart> Starts { get; } = [];
        public List<StepBlock> Blocks { get; } = [];

        public ValueTask<float[]> Begin(StepStart step)
        {
            Starts.Add(step);
            return new(parameters);
        }

        public GradientBlock? FusedUpdate => null;

        public ValueTask<bool> Apply(StepBlock block)
        {
            Blocks.Add(block);
            if (Blocks.Count > stopAfter) return new(false);
            var state = new float[optimizer.StateVectors * parameters.Length];
            optimizer.Step(block.Version, parameters, block.Sum.Span, block.Samples, state);
            return new(true);
        }
    }

    /// <summary>Records what a block's progress reported: the loss, and each range with its values at the time it was reported.</summary>
    private sealed class Watching : BlockProgress
    {
        public List<double> Losses { get; } = [];
        public List<(int Start, float[] Values, bool AfterLoss)> Ranges { get; } = [];

        protected override void LossKnown(double loss) => Losses.Add(loss);

        protected override void Written(int start, int length)
        {
            var values = Sum.Span.Slice(start, length).ToArray();
            lock (Ranges) Ranges.Add((start, values, Losses.Count > 0));
        }
    }

    [Theory]
    [InlineData(0, 1, 1)]   // one chunk alone: its sum is the block's
    [InlineData(0, 4, 1)]   // the last of four chunks merges with the three before it
    [InlineData(4, 7, 2)]   // an uneven node of a 7-chunk step, on two threads
    public void A_blocks_progress_reports_its_loss_first_then_every_range_once_with_its_final_values(int first, int end, int threads)
    {
        var spec = (Presets.PyTorchMlp with { BatchSize = 112, ChunkSize = 16, Seed = 3 }).Resolve(Data.Train.Count);
        var plan = new EpochPlan(Data.Train.Count, spec.BatchSize, spec.ChunkSize, spec.Seed, epoch: 0);
        var parameters = Initializer.Create(spec.Model, spec.Init, spec.Seed);
        using var plain = new StepGradient(spec.Model, spec.ChunkSize, spec.ChunksPerStep, threads);
        using var watched = new StepGradient(spec.Model, spec.ChunkSize, spec.ChunksPerStep, threads);
        var progress = new Watching();

        double expectedLoss = plain.SumBlock(Data.Train, plan, 0, first, end, parameters);
        double loss = watched.SumBlock(Data.Train, plan, 0, first, end, parameters, progress: progress);

        Assert.Equal(expectedLoss, loss);
        Assert.Equal([loss], progress.Losses);
        Assert.Equal(plain.Result.ToArray(), watched.Result.ToArray());
        var covered = new int[parameters.Length];
        foreach (var (start, values, afterLoss) in progress.Ranges)
        {
            Assert.True(afterLoss);
            // Final when reported: the values then are the finished sum's.
            Assert.Equal(plain.Result.Span.Slice(start, values.Length).ToArray(), values);
            for (int i = start; i < start + values.Length; i++) covered[i]++;
        }
        Assert.All(covered, c => Assert.Equal(1, c));
    }

    [Fact]
    public async Task The_loop_hands_out_each_steps_version_and_samples_and_stops_where_the_target_says()
    {
        var spec = (Presets.PyTorchMlp with { BatchSize = 64, ChunkSize = 16, Seed = 3 }).Resolve(Data.Train.Count);
        var plan = new EpochPlan(Data.Train.Count, spec.BatchSize, spec.ChunkSize, spec.Seed, epoch: 1);
        using var gradient = new StepGradient(spec.Model, spec.ChunkSize, spec.ChunksPerStep, threads: 1);
        var target = new Recording(Initializer.Create(spec.Model, spec.Init, spec.Seed), Optimizer.For(spec.Optimizer with { Kind = OptimizerKind.Sgd }), stopAfter: 2);

        int applied = await StepLoop.Run(gradient, Data.Train, plan, firstStep: 1, steps: 4, firstVersion: 6, block: (2, 4), target);

        Assert.Equal(2, applied);
        Assert.Equal([new StepStart(1, 6, 64), new StepStart(2, 7, 64), new StepStart(3, 8, 64)], target.Starts);
        Assert.Equal([1, 2, 3], target.Blocks.Select(b => b.Step));
        Assert.All(target.Blocks, b => Assert.Equal(gradient.ParameterCount, b.Sum.Length));
        Assert.All(target.Blocks, b => Assert.True(b.Loss > 0 && b.ComputeSeconds >= 0));
    }

    [Fact]
    public async Task An_epoch_of_whole_steps_applied_by_a_target_of_its_own_is_local_trainers_epoch()
    {
        // 300 samples at batch 64: four steps of 64 and a last one of 44 (3 chunks of 16).
        var spec = (Presets.PyTorchMlp with { BatchSize = 64, ChunkSize = 16, Seed = 3, Optimizer = Presets.PyTorchMlp.Optimizer with { Kind = OptimizerKind.Sgd } })
            .Resolve(Data.Train.Count);
        using var local = new LocalTrainer(spec, Data.Train);
        local.TrainEpoch(0);

        var plan = new EpochPlan(Data.Train.Count, spec.BatchSize, spec.ChunkSize, spec.Seed, epoch: 0);
        using var gradient = new StepGradient(spec.Model, spec.ChunkSize, spec.ChunksPerStep, threads: 1);
        var target = new Recording(Initializer.Create(spec.Model, spec.Init, spec.Seed), spec.CreateOptimizer());
        Assert.Equal(plan.Steps, await StepLoop.Run(gradient, Data.Train, plan, 0, plan.Steps, 0, block: null, target));

        Assert.Equal(44, target.Starts[^1].Samples);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), ParameterHash.Sha256(target.Parameters));
    }
}
