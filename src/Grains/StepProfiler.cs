using System.Diagnostics;
using Backprop.Grains.Messages;

namespace Backprop.Grains;

/// <summary>
/// Adds up where an epoch's training steps spend their time, for <see cref="StepProfile"/>. Fed by the
/// coordinator with each call's replies; allocation counters are per process, so each silo's counter counts
/// once however many of the call's grains it hosts. Allocates nothing per call once every silo has been seen.
/// </summary>
internal sealed class StepProfiler(string coordinatorSilo)
{
    private readonly Dictionary<string, (long Start, long End)> _processes = new(StringComparer.Ordinal);
    private int _steps, _calls, _allocationSteps;
    private double _slowest, _fastest, _transfer, _reduce, _serverCall, _barrier, _wireBytes, _allocated;
    private long _trainTicks;

    public void Reset()
    {
        (_steps, _calls, _allocationSteps, _trainTicks) = (0, 0, 0, 0);
        (_slowest, _fastest, _transfer, _reduce, _serverCall, _barrier, _wireBytes, _allocated) = (0, 0, 0, 0, 0, 0, 0, 0);
    }

    /// <summary>
    /// One call to the workers that applied <paramref name="steps"/> steps: the workers' replies (their times summed over
    /// those steps) with each one's round trip and reply time (timestamps), and the call's wall time. The workers pushed
    /// and pulled the vectors themselves and counted the bytes that crossed to other processes.
    /// </summary>
    public void Add(ReadOnlySpan<BlockDone> blocks, ReadOnlySpan<long> roundTrips, ReadOnlySpan<long> replied, long ticks, int steps, long coordinatorAllocatedAtStart)
    {
        double slowest = 0, fastest = double.MaxValue, transfer = 0, reduce = 0, push = 0, wire = 0;
        long first = long.MaxValue, last = long.MinValue;
        for (int i = 0; i < blocks.Length; i++)
        {
            var b = blocks[i];
            double roundTrip = Seconds(roundTrips[i]);
            if (b.ComputeSeconds >= slowest)
                (slowest, transfer, push) = (b.ComputeSeconds, Math.Max(0, roundTrip - b.ComputeSeconds - b.PushSeconds) + b.PullSeconds, b.PushSeconds);
            fastest = Math.Min(fastest, b.ComputeSeconds);
            reduce = Math.Max(reduce, b.ReduceAndStepSeconds);
            (first, last) = (Math.Min(first, replied[i]), Math.Max(last, replied[i]));
            wire += b.WireBytes;
            Snapshot(b.Silo, b.AllocatedBytesAtStart, b.AllocatedBytes);
        }
        Snapshot(coordinatorSilo, coordinatorAllocatedAtStart, GC.GetTotalAllocatedBytes(precise: false));

        (_steps, _calls) = (_steps + steps, _calls + 1);
        _trainTicks += ticks;
        (_slowest, _fastest, _transfer, _wireBytes) = (_slowest + slowest, _fastest + (blocks.Length > 0 ? fastest : 0), _transfer + transfer, _wireBytes + wire);
        _reduce += reduce;
        // The slowest worker's pushes: from sending its sums to the next versions back, minus the shards' own pass.
        _serverCall += Math.Max(0, push - reduce);
        _barrier += blocks.Length > 0 ? Seconds(last - first) : 0;
        foreach (var (start, end) in _processes.Values) _allocated += end - start;
        _processes.Clear();
        _allocationSteps += steps;
    }

    public StepProfile? Result()
    {
        if (_steps == 0) return null;
        double n = _steps;
        return new StepProfile(_steps, Seconds(_trainTicks), _slowest / n, _fastest / n, _transfer / n, _reduce / n, _serverCall / n,
            _barrier / n, _wireBytes / n, _allocationSteps > 0 ? _allocated / _allocationSteps : 0, _calls);
    }

    /// <summary>A process' counter over a call: the lowest reading at its start and the highest at its end (its grains report at different times).</summary>
    private void Snapshot(string silo, long start, long end)
    {
        if (start <= 0 || end <= 0) return;
        ref var seen = ref System.Runtime.InteropServices.CollectionsMarshal.GetValueRefOrAddDefault(_processes, silo, out bool existed);
        seen = existed ? (Math.Min(seen.Start, start), Math.Max(seen.End, end)) : (start, end);
    }

    private static double Seconds(long ticks) => ticks / (double)Stopwatch.Frequency;
}
