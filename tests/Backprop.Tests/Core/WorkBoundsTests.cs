using System.Reflection;
using Backprop.Core.Model;
using Backprop.Core.Training;
using Backprop.Grains;

namespace Backprop.Tests.Core;

public sealed class WorkBoundsTests
{
    [Fact]
    public void A_step_bound_follows_the_work_and_the_window_is_its_steps()
    {
        var spec = Presets.PyTorchMlp;
        var one = WorkBounds.Step(spec, 1);
        // 3 s fixed + 6 x 109,386 parameters x 16 samples at 0.2 GFLOP/s + 3 vectors of 437,544 bytes at 10 MB/s.
        Assert.Equal(3 + 6.0 * 109_386 * 16 / 2e8 + 3.0 * 437_544 / 1e7, one.TotalSeconds, precision: 6);
        Assert.True(WorkBounds.Step(spec, 4) > one);
        Assert.Equal(one.TotalSeconds * 50, WorkBounds.Window(spec, 1, 50).TotalSeconds, precision: 6);
        Assert.True(WorkBounds.Evaluation(spec, 1024) < WorkBounds.Evaluation(spec, 10_000));
    }

    [Fact]
    public void A_spec_whose_step_could_outlast_a_call_is_refused()
    {
        // 16.7M parameters (the message cap), chunks of 4096 samples: ~5e11 FLOPs a chunk, 4 chunks a step, over 1 h at the floor rate.
        var huge = Presets.PyTorchMlp with
        {
            Model = Presets.PyTorchMlp.Model with { Layers = [784, 4096, 3000, 10] },
            BatchSize = 16384, ChunkSize = 4096,
        };
        var refused = Assert.Throws<ArgumentException>(() => WorkBounds.Check(huge));
        Assert.Contains("over the 1 h a call may take", refused.Message);
        WorkBounds.Check(Presets.PyTorchMlp);
    }

    [Fact]
    public void The_worker_calls_may_take_longer_than_the_longest_bound()
    {
        foreach (var name in new[] { nameof(IWorkerGrain.ComputeBlock), nameof(IWorkerGrain.Evaluate) })
        {
            var timeout = typeof(IWorkerGrain).GetMethod(name)!.GetCustomAttribute<ResponseTimeoutAttribute>();
            Assert.NotNull(timeout);
            Assert.True(timeout.Timeout > WorkBounds.Longest, $"{name}: {timeout.Timeout}");
        }
    }
}
