using Backprop.Core.Training;

namespace Backprop.Tests.Core;

public sealed class StepWindowTests
{
    // 1000 samples, batch 64, chunk 16: 16 steps, the last one short (40 samples, 3 chunks instead of 4).
    private static EpochPlan Plan() => new(1000, 64, 16, seed: 1, epoch: 0);
    private static readonly TimeSpan Target = TimeSpan.FromMilliseconds(200);

    [Fact]
    public void A_window_is_the_target_time_of_steps_at_the_measured_speed_at_most_max()
    {
        Assert.Equal(1, StepWindow.Steps(0, Target, 512, Plan(), 0, 0, 1000));          // speed unknown: one step
        Assert.Equal(4, StepWindow.Steps(0.05, Target, 512, Plan(), 0, 0, 1000));       // 200 ms of 50 ms steps
        Assert.Equal(1, StepWindow.Steps(10, Target, 512, Plan(), 0, 0, 1000));         // slower than the target: one
        Assert.Equal(3, StepWindow.Steps(1e-6, Target, 3, Plan(), 0, 0, 1000));         // at most max
    }

    [Fact]
    public void A_window_ends_at_the_next_checkpoint_and_before_the_short_last_step()
    {
        var plan = Plan();
        Assert.Equal(16, plan.Steps);
        Assert.NotEqual(plan.ChunkCount(0), plan.ChunkCount(15));
        // Version 37 with a checkpoint every 10 steps: 3 steps to version 40.
        Assert.Equal(3, StepWindow.Steps(1e-6, Target, 512, plan, 2, 37, 10));
        // From step 10 with room for all: steps 10..14, the short step 15 alone in the next window.
        Assert.Equal(5, StepWindow.Steps(1e-6, Target, 512, plan, 10, 10, 1000));
        Assert.Equal(1, StepWindow.Steps(1e-6, Target, 512, plan, 15, 15, 1000));
    }

    [Fact]
    public void Steps_outside_the_epoch_are_refused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => StepWindow.Steps(1, Target, 512, Plan(), 16, 0, 10));
        Assert.Throws<ArgumentOutOfRangeException>(() => StepWindow.Steps(1, Target, 0, Plan(), 0, 0, 10));
    }
}
