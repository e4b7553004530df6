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
    /// One step: the workers' replies with each one's round trip and reply time (timestamps), the server's outcome
    /// and its call's round trip, the step's wall time, and the bytes of one parameter vector.
    /// </summary>
    public void Add(ReadOnlySpan<BlockSum> blocks, ReadOnlySpan<long> roundTrips, ReadOnlySpan<long> replied,
        StepOutcome outcome, long serverCallTicks, string? serverSilo, long stepTicks, long vectorBytes)
    {
        double slowest = 0, fastest = double.MaxValue, transfer = 0, wire = 0;
        long first = long.MaxValue, last = long.MinValue;
        for (int i = 0; i < blocks.Length; i++)
        {
            var b = blocks[i];
            double roundTrip = Seconds(roundTrips[i]);
            if (b.ComputeSeconds >= slowest) (slowest, transfer) = (b.ComputeSeconds, Math.Max(0, roundTrip - b.ComputeSeconds));
            fastest = Math.Min(fastest, b.ComputeSeconds);
            (first, last) = (Math.Min(first, replied[i]), Math.Max(last, replied[i]));
            // The block's sum back from another process, and the parameters once per other process.
            if (b.Silo != coordinatorSilo) wire += (FirstOfSilo(blocks, i) ? 2.0 : 1.0) * vectorBytes;
            Snapshot(b.Silo, b.AllocatedBytes);
        }
        if (serverSilo is not null && serverSilo != coordinatorSilo)
        {
            wire += (blocks.Length + 1.0) * vectorBytes;   // the sums to the server, the new version back
            Snapshot(serverSilo, outcome.AllocatedBytes);
        }
        Snapshot(coordinatorSilo, GC.GetTotalAllocatedBytes(precise: false));

        _steps++;
        _trainTicks += stepTicks;
        (_slowest, _fastest, _transfer, _wireBytes) = (_slowest + slowest, _fastest + (blocks.Length > 0 ? fastest : 0), _transfer + transfer, _wireBytes + wire);
        _reduce += outcome.ReduceAndStepSeconds;
        _serverCall += Math.Max(0, Seconds(serverCallTicks) - outcome.ReduceAndStepSeconds);
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

    private static bool FirstOfSilo(ReadOnlySpan<BlockSum> blocks, int i)
    {
        for (int j = 0; j < i; j++)
            if (blocks[j].Silo == blocks[i].Silo) return false;
        return true;
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
