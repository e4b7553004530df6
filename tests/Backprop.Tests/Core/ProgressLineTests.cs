using Backprop.Client;
using Backprop.Core.Training;
using Backprop.Grains.Messages;

namespace Backprop.Tests.Core;

public sealed class ProgressLineTests
{
    private static RunStatus At(int epoch, int step, RunState state = RunState.Running) =>
        new("r", state, Presets.PyTorchMlp with { Epochs = 3 }, epoch, step, 100, [], null, [], "", [], epoch * 100L + step, [], epoch, []);

    [Fact]
    public void The_line_shows_the_rate_over_the_last_seconds_and_the_time_left_in_the_epoch_and_the_run()
    {
        var now = TimeSpan.Zero;
        var line = new ProgressLine(() => now);
        Assert.Equal("epoch 1/3 [..........] 0/100  0:00 elapsed", line.Update(At(0, 0)));
        now = TimeSpan.FromSeconds(2);
        // 50 steps of 64 samples in 2 s: 1,600 samples/s, 25 steps a second; 50 steps left in the epoch, 250 in the run.
        Assert.Equal("epoch 1/3 [#####.....] 50/100   1,600 samples/s  0:02 elapsed  ETA 0:02 (run 0:10)", line.Update(At(0, 50)));
        now = TimeSpan.FromSeconds(30);
        // The rate is that of the last 10 s or so (the sample at 0 s is dropped): 60 steps in 28 s; 2nd epoch, step 10 is 110 steps in.
        Assert.Equal("epoch 2/3 [#.........] 10/100     137 samples/s  0:30 elapsed  ETA 0:42 (run 1:28)", line.Update(At(1, 10)));
        Assert.Null(line.Update(At(1, 10, RunState.Completed)));
    }

    [Fact]
    public void Clock_reads_minutes_and_hours()
    {
        Assert.Equal("0:05", ProgressLine.Clock(5));
        Assert.Equal("2:03", ProgressLine.Clock(123));
        Assert.Equal("1:00:01", ProgressLine.Clock(3601));
        Assert.Equal("0:00", ProgressLine.Clock(-1));
    }
}
