using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace Backprop.Silo;

/// <summary>
/// Logs every change of another silo's status as this silo learns it ("silo-1 ... is Dead"). Orleans' own
/// membership lines are too chatty to keep, and operators (and the failure-detection measurements) need
/// to see when a killed silo was declared dead and by whom.
/// </summary>
public sealed class MembershipLog(IClusterMembershipService membership, ILocalSiloDetails self, ILogger<MembershipLog> log) : BackgroundService
{
    protected override async Task ExecuteAsync(CancellationToken stop)
    {
        ClusterMembershipSnapshot? previous = null;
        try
        {
            await foreach (var snapshot in membership.MembershipUpdates.WithCancellation(stop))
            {
                if (previous is not null)
                {
                    foreach (var member in snapshot.CreateUpdate(previous).Changes)
                    {
                        if (member.SiloAddress.Equals(self.SiloAddress)) continue;
                        log.LogInformation("membership: {Name} ({Address}) is {Status}", member.Name, member.SiloAddress, member.Status);
                    }
                }
                previous = snapshot;
            }
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
        }
    }
}
