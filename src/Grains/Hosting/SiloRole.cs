using Orleans.Configuration;
using Orleans.Metadata;

namespace Backprop.Grains.Hosting;

/// <summary>
/// What a silo hosts. <see cref="Server"/>: run coordinators and the run registry; <see cref="Worker"/>: worker
/// grains; <see cref="All"/>: both (a single silo, the CLI's embedded silo, test clusters). Parameter-server shards
/// go to every silo, spread by shard number, beside the workers.
/// </summary>
public enum SiloRole { All, Server, Worker }

public static class SiloRoles
{
    public static SiloRole Parse(string text) => text.Trim().ToLowerInvariant() switch
    {
        "all" => SiloRole.All,
        "server" => SiloRole.Server,
        "worker" => SiloRole.Worker,
        _ => throw new ArgumentException($"--role: '{text}' is not server, worker or all"),
    };


    /// <summary>
    /// A role is the set of grain classes a silo registers. Orleans places a grain only on silos whose grain
    /// manifest has its class, so this is all the placement roles need, with every strategy (spread, prefer-local,
    /// the default). Placement filters on silo metadata were the alternative; the metadata of a joining silo is
    /// fetched once and, when that fails, not again for a while, whereas the manifest is what placement already waits for.
    /// </summary>
    internal static ISiloBuilder ApplyRole(this ISiloBuilder silo, SiloRole role) => silo.Configure<GrainTypeOptions>(o =>
    {
        if (role == SiloRole.Server) o.Classes.Remove(typeof(WorkerGrain));
        if (role == SiloRole.Worker)
        {
            o.Classes.Remove(typeof(RunGrain));
            o.Classes.Remove(typeof(RunRegistryGrain));
        }
    });
}

/// <summary>The cluster's active silos that host workers, in address order (the order <see cref="Placement.SpreadPlacementDirector"/> uses).</summary>
public sealed class WorkerSilos(IClusterManifestProvider manifests, IClusterMembershipService membership, GrainTypeResolver types) : IWorkerSilos
{
    private readonly GrainType _worker = types.GetGrainType(typeof(WorkerGrain));

    private (MembershipVersion Membership, MajorMinorVersion Manifest, string[] Silos) _cached;

    /// <summary>Recomputed only when membership or the cluster manifest changed: the coordinator asks before every step.</summary>
    public string[] Active()
    {
        var members = membership.CurrentSnapshot;
        var manifest = manifests.Current;
        var cached = _cached;
        if (cached.Silos is not null && cached.Membership == members.Version && cached.Manifest == manifest.Version) return cached.Silos;
        var silos = manifest.Silos
            .Where(s => s.Value.Grains.ContainsKey(_worker) && members.GetSiloStatus(s.Key) == SiloStatus.Active)
            .Select(s => s.Key)
            .OrderBy(s => s.ToParsableString(), StringComparer.Ordinal)
            .Select(s => s.Endpoint.ToString())
            .ToArray();
        _cached = (members.Version, manifest.Version, silos);
        return silos;
    }
}
