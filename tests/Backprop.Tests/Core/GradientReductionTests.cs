using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;

namespace Backprop.Tests.Core;

public class GradientReductionTests
{
    private static readonly TrainTest Data = SyntheticDigits.Create(trainCount: 200, testCount: 10, seed: 7);

    /// <summary>The tree as the README defines it, level by level: the oracle for the streaming implementation.</summary>
    private static float[] LevelByLevel(IReadOnlyList<float[]> leaves)
    {
        var level = leaves.Select(l => (float[])l.Clone()).ToList();
        while (level.Count > 1)
        {
            var up = new List<float[]>();
            for (int i = 0; i < level.Count; i += 2)
                up.Add(i + 1 < level.Count ? level[i].Zip(level[i + 1], (a, b) => a + b).ToArray() : level[i]);
            level = up;
        }
        return level[0];
    }

    private static List<float[]> Leaves(int count, int length, int seed)
    {
        var rng = new Random(seed);
        // Values of very different magnitudes: any other order of additions changes some bits.
        return Enumerable.Range(0, count).Select(_ => Enumerable.Range(0, length)
            .Select(_ => (float)((rng.NextDouble() - 0.5) * Math.Pow(10, rng.Next(-4, 5)))).ToArray()).ToList();
    }

    [Theory]
    [InlineData(1)] [InlineData(2)] [InlineData(3)] [InlineData(4)] [InlineData(5)] [InlineData(7)]
    [InlineData(8)] [InlineData(9)] [InlineData(13)] [InlineData(16)] [InlineData(17)]
    public void Whole_leaves_and_block_by_block_leaves_both_give_the_level_by_level_tree(int count)
    {
        const int length = 37;
        var leaves = Leaves(count, length, count);
        string expected = ParameterHash.Sha256(LevelByLevel(leaves));
        // The data tells the orders apart: a left fold (the old order) gives other bits from 4 leaves on.
        string fold = ParameterHash.Sha256(leaves.Skip(1).Aggregate(leaves[0], (a, b) => a.Zip(b, (x, y) => x + y).ToArray()));
        if (count >= 4) Assert.NotEqual(expected, fold);

        var sum = new PairwiseSum(length, 20);
        sum.Begin(count);
        foreach (var leaf in leaves) DeliverWhole(sum, leaf);
        Assert.Equal(expected, ParameterHash.Sha256(sum.Result.ToArray()));

        // As the backprop threads deliver them: blocks of uneven sizes, in no particular order.
        sum.Begin(count);
        foreach (var leaf in leaves) Deliver(sum, leaf);
        Assert.Equal(expected, ParameterHash.Sha256(sum.Result.ToArray()));

        // The root to a callback (the fused optimizer), block by block.
        var root = new float[length];
        sum.Begin(count, (start, values) => values.CopyTo(root.AsSpan(start)));
        foreach (var leaf in leaves) Deliver(sum, leaf);
        Assert.True(sum.Done);
        Assert.Equal(expected, ParameterHash.Sha256(root));
    }

    private static void DeliverWhole(PairwiseSum sum, float[] leaf)
    {
        var target = sum.NextLeaf();
        if (target.Buffer is { } buffer) leaf.CopyTo(buffer, 0);
        else target.Blocks!(0, leaf);
        sum.Next();
    }

    private static void Deliver(PairwiseSum sum, float[] leaf)
    {
        var target = sum.NextLeaf();
        if (target.Buffer is { } buffer) leaf.CopyTo(buffer, 0);
        else
        {
            int half = leaf.Length / 2;
            foreach (var (start, n) in new[] { (half, leaf.Length - half), (0, 5), (5, half - 5) }) target.Blocks!(start, leaf.AsSpan(start, n));
        }
        sum.Next();
    }

    [Theory]
    [InlineData(4, 1)] [InlineData(4, 2)] [InlineData(4, 3)] [InlineData(4, 4)] [InlineData(4, 9)]
    [InlineData(7, 2)] [InlineData(7, 3)] [InlineData(7, 5)] [InlineData(13, 4)] [InlineData(16, 5)] [InlineData(16, 11)] [InlineData(1, 3)]
    public void Workers_reducing_their_aligned_blocks_and_a_server_reducing_the_blocks_give_the_same_bits(int chunks, int workers)
    {
        const int length = 29;
        var leaves = Leaves(chunks, length, 100 + chunks);
        string expected = ParameterHash.Sha256(LevelByLevel(leaves));

        var blocks = ChunkBlocks.For(chunks, workers);
        Assert.Equal(Math.Min(chunks, workers), blocks.Count);   // every worker busy while there are chunks
        Assert.Equal(0, blocks.First(0));
        Assert.Equal(chunks, blocks.End(blocks.Count - 1));
        var partials = new List<ReadOnlyMemory<float>>();
        for (int b = 0; b < blocks.Count; b++)
        {
            Assert.True(PairwiseSum.IsNode(blocks.First(b), blocks.End(b), chunks));
            var worker = new PairwiseSum(length, chunks);
            worker.Begin(blocks.End(b) - blocks.First(b));
            for (int c = blocks.First(b); c < blocks.End(b); c++) Deliver(worker, leaves[c]);
            partials.Add(worker.Result.ToArray());
        }
        // The server, a tile at a time (tiles of 8 entries here, the last one short).
        var total = new float[length];
        var scratch = new float[PairwiseSum.ScratchFor(8, chunks)];
        for (int start = 0; start < length; start += 8)
            PairwiseSum.SumNodes(partials.ToArray(), blocks.Starts, chunks, start, total.AsSpan(start, Math.Min(8, length - start)), scratch);
        Assert.Equal(expected, ParameterHash.Sha256(total));
    }

    [Fact]
    public void The_largest_blocks_are_split_first_and_only_tree_nodes_are_blocks()
    {
        Assert.Equal([0, 1, 2], ChunkBlocks.For(4, 3).Starts.ToArray());
        Assert.Equal([0, 2], ChunkBlocks.For(4, 2).Starts.ToArray());
        Assert.Equal([0, 4], ChunkBlocks.For(5, 2).Starts.ToArray());
        Assert.Equal([0, 1, 2, 4, 6], ChunkBlocks.For(7, 5).Starts.ToArray());
        Assert.True(PairwiseSum.IsNode(4, 7, 7));
        Assert.False(PairwiseSum.IsNode(1, 3, 4));
        Assert.False(PairwiseSum.IsNode(2, 5, 8));
        Assert.False(PairwiseSum.IsNode(0, 3, 4));
    }

    [Fact]
    public void A_sum_reuses_its_buffers_and_allocates_nothing()
    {
        var leaves = Leaves(8, 1000, 5);
        var sum = new PairwiseSum(1000, 8);
        sum.Begin(8);
        foreach (var leaf in leaves) Deliver(sum, leaf);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 10; i++)
        {
            sum.Begin(8);
            foreach (var leaf in leaves) DeliverWhole(sum, leaf);
        }
        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
    }

    [Fact]
    public void A_step_of_several_chunks_in_local_training_is_the_tree_of_its_chunk_sums()
    {
        var spec = Presets.PyTorchMlp with { BatchSize = 40, ChunkSize = 8, Seed = 4 };   // 5 chunks: not a power of two
        using var trainer = new LocalTrainer(spec, Data.Train, threads: 2);
        trainer.TrainEpoch(0, maxSteps: 2);

        var p = Initializer.Create(spec.Model, spec.Init, spec.Seed);
        var velocity = new float[p.Length];
        using var runner = new ChunkRunner(spec.Model, spec.ChunkSize);
        var plan = new EpochPlan(Data.Train.Count, spec.BatchSize, spec.ChunkSize, spec.Seed, 0);
        for (int step = 0; step < 2; step++)
        {
            var sums = Enumerable.Range(0, plan.ChunkCount(step)).Select(c =>
            {
                var g = new float[p.Length];
                runner.GradientSum(Data.Train, p, plan.Chunk(step, c), g);
                return g;
            }).ToList();
            Optimizer.For(spec.Optimizer).Step(0, p, LevelByLevel(sums), plan.StepSize(step), velocity);
        }
        Assert.Equal(ParameterHash.Sha256(p), ParameterHash.Sha256(trainer.Parameters));
    }
}
