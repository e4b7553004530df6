using Backprop.Core.Numerics;

namespace Backprop.Tests.Core;

public sealed class RowParallelTests
{
    [Theory]
    [InlineData(0)]   // the caller's own part
    [InlineData(1)]   // a kept thread's part: escaping there would end the process (a silo with it)
    public void An_exception_in_any_part_reaches_the_caller_and_the_threads_work_on(int failingThread)
    {
        using var parallel = new RowParallel(2);
        var state = new Probe();
        var thrown = Assert.Throws<InvalidOperationException>(() => parallel.Run(64, state, (probe, thread, from, to) =>
        {
            if (thread == failingThread) throw new InvalidOperationException($"part {thread} failed");
            Interlocked.Add(ref probe.Rows, to - from);
        }));
        Assert.Equal($"part {failingThread} failed", thrown.Message);
        Assert.Equal(32, state.Rows);   // the other part ran to its end before the caller heard of the failure

        // Both threads still take work, and a failure does not stick to the next call.
        var after = new Probe();
        parallel.Run(64, after, static (probe, _, from, to) => Interlocked.Add(ref probe.Rows, to - from));
        Assert.Equal(64, after.Rows);
        int rows = 0;
        Assert.Throws<ArgumentException>(() => parallel.Run(64, (from, to) =>
        {
            if (from > 0) throw new ArgumentException("plain job");
            Interlocked.Add(ref rows, to - from);
        }));
        Assert.Equal(32, rows);
    }

    private sealed class Probe
    {
        public int Rows;
    }
}
