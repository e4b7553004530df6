using System.Diagnostics;
using Backprop.Grains.Messages;

namespace Backprop.Grains;

/// <summary>
/// Adds up where an epoch's training steps spend their time, for <see cref="StepProfile"/>. Fed by the
/// coordinator with each step's replies; allocation counters are per process, so each silo's counter counts
/// once however many of the step's grains it hosts. Allocates nothing per step once every silo has been seen.
/// </summary>
internal sealed class StepProfiler(string coordinatorSilo)
{
    private readonly Dictionary<string, long> _lastAllocated = new(StringComparer.Ordinal);
    private readonly Dictionary<string, long> _stepAllocated = new(StringComparer.Ordinal);
    private int _steps, _allocationSteps;
    private double _slowest, _fastest, _transfer, _reduce, _serverCall, _barrier, _wireBytes, _allocated;
    private long _trainTicks;

    public void Reset()
    {
        (_steps, _allocationSteps, _trainTicks) = (0, 0, 0);
        (_slowest, _fastest, _transfer, _reduce, _serverCall, _barrier, _wireBytes, _allocated) = (0, 0, 0, 0, 0, 0, 0, 0);
        _lastAllocated.Clear();
    }

    /// <summary>
    /// One step: the workers' replies with each one's round trip and reply time (timestamps), and the step's wall time.
    /// The workers pushed and pulled the vectors themselves and counted the bytes that crossed to other processes.
    /// </summary>
    public void Add(ReadOnlySpan<BlockDone> blocks, ReadOnlySpan<long> roundTrips, ReadOnlySpan<long> replied, long stepTicks)
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
            Snapshot(b.Silo, b.AllocatedBytes);
        }
        Snapshot(coordinatorSilo, GC.GetTotalAllocatedBytes(precise: false));

        _steps++;
        _trainTicks += stepTicks;
        (_slowest, _fastest, _transfer, _wireBytes) = (_slowest + slowest, _fastest + (blocks.Length > 0 ? fastest : 0), _transfer + transfer, _wireBytes + wire);
        _reduce += reduce;
        // The slowest worker's pushes: from sending its sum to the next version back, minus the shards' own pass.
        _serverCall += Math.Max(0, push - reduce);
        _barrier += blocks.Length > 0 ? Seconds(last - first) : 0;
        CountAllocations();
    }

    public StepProfile? Result()
    {
        if (_steps == 0) return null;
        double n = _steps;
        return new StepProfile(_steps, Seconds(_trainTicks), _slowest / n, _fastest / n, _transfer / n, _reduce / n, _serverCall / n,
            _barrier / n, _wireBytes / n, _allocationSteps > 0 ? _allocated / _allocationSteps : 0);
    }

    /// <summary>The highest counter a process reported during this step (its grains report at different times).</summary>
    private void Snapshot(string silo, long allocated)
    {
        if (allocated <= 0) return;
        ref long seen = ref System.Runtime.InteropServices.CollectionsMarshal.GetValueRefOrAddDefault(_stepAllocated, silo, out _);
        seen = Math.Max(seen, allocated);
    }

    /// <summary>Each process' growth since its report in the step before; the first step of a process only sets its base.</summary>
    private void CountAllocations()
    {
        long grown = 0;
        bool any = false;
        foreach (var (silo, now) in _stepAllocated)
        {
            ref long last = ref System.Runtime.InteropServices.CollectionsMarshal.GetValueRefOrAddDefault(_lastAllocated, silo, out bool existed);
            if (existed) (grown, any) = (grown + (now - last), true);
            last = now;
        }
        _stepAllocated.Clear();
        if (!any) return;
        _allocated += grown;
        _allocationSteps++;
    }

    private static double Seconds(long ticks) => ticks / (double)Stopwatch.Frequency;
}
