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
}
