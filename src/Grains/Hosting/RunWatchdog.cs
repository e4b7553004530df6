using Backprop.Grains.Messages;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains.Hosting;

/// <summary>
/// Keeps runs going when their coordinator's silo is lost. When membership declares a silo dead (and every
/// <see cref="SweepInterval"/> as a backstop, which also covers a whole-cluster restart), it calls every run
/// the registry lists as running; a call to a run whose activation died activates it on a live silo, and the
/// new activation continues from the last checkpoint. Orleans reminders could do the same, but their period
/// is at least a minute and they fire only after the reminder table is re-read: too slow for a resume within
/// seconds. Every silo runs one; the calls are idempotent, so several silos reacting at once do no harm.
/// </summary>
public sealed class RunWatchdog(IClusterMembershipService membership, IGrainFactory grains, ILogger<RunWatchdog> logger) : BackgroundService
{
    public static readonly TimeSpan SweepInterval = TimeSpan.FromSeconds(15);

    protected override async Task ExecuteAsync(CancellationToken stop)
    {
        var sweep = Sweep(stop);
        try
        {
            ClusterMembershipSnapshot? previous = null;
            await foreach (var snapshot in membership.MembershipUpdates.WithCancellation(stop))
            {
                var update = previous is null ? snapshot.AsUpdate() : snapshot.CreateUpdate(previous);
                previous = snapshot;
                if (update.Changes.Any(m => m.Status == SiloStatus.Dead)) await KeepRunsGoing(stop);
            }
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
        }
        await sweep;
    }

    private async Task Sweep(CancellationToken stop)
    {
        using var timer = new PeriodicTimer(SweepInterval);
        try
        {
            while (await timer.WaitForNextTickAsync(stop)) await KeepRunsGoing(stop);
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
        }
    }

    private async Task KeepRunsGoing(CancellationToken stop)
    {
        string[] running;
        IRunRegistryGrain registry;
        try
        {
            // In the try too: on a worker silo that knows no server silo yet (or any more), Orleans refuses the reference itself.
            registry = grains.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key);
            running = await registry.Running().WaitAsync(CallLimit, stop);
        }
        catch (Exception e) when (!stop.IsCancellationRequested)
        {
            // The silo may not be serving yet, or the cluster is changing: the next event or sweep tries again.
            logger.LogDebug("Watchdog: run list unavailable ({Error})", e.Message);
            return;
        }
        // One run that cannot be reached (its state unreadable, its silo just lost) does not hold up the others.
        foreach (var runId in running)
        {
            try
            {
                var status = await grains.GetGrain<IRunGrain>(runId).GetStatus(int.MaxValue).WaitAsync(CallLimit, stop);
                // A run the registry still lists as running but that has finished (or never started) is corrected.
                if (status.State != RunState.Running)
                {
                    var last = status.EpochsDone > 0 ? (await grains.GetGrain<IRunGrain>(runId).GetStatus(status.EpochsDone - 1)).Epochs.LastOrDefault() : null;
                    await registry.Update(new RunSummary(runId, status.State, status.EpochsDone, status.Spec?.Epochs ?? 0, last?.TestAccuracy, DateTime.UtcNow))
                        .WaitAsync(CallLimit, stop);
                }
            }
            catch (Exception e) when (!stop.IsCancellationRequested)
            {
                logger.LogWarning("Watchdog: run {Run} did not answer ({Error}); trying again at the next sweep", runId, e.Message);
            }
        }
    }

    private static readonly TimeSpan CallLimit = TimeSpan.FromSeconds(10);
}
