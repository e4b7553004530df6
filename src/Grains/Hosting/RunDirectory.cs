using System.Diagnostics.CodeAnalysis;
using Microsoft.Extensions.DependencyInjection;
using Orleans.GrainDirectory;
using Orleans.Metadata;
using Orleans.Runtime.GrainDirectory;

namespace Backprop.Grains.Hosting;

/// <summary>
/// On Redis clusters, where a run's coordinator, its parameter-server shards and the run registry are registered: in Redis
/// instead of Orleans' default directory, which is spread over the silos. With the default one, the silo that held a
/// grain's registration could be any silo, a worker silo too, and when that silo left the cluster the grain was
/// deactivated (the run resumed from a checkpoint). A registration in Redis belongs to no
/// silo: only the grain's own silo leaving ends it.
/// <para>
/// Entries live under <c>{ClusterId}/directory/</c> in the cluster's Redis (Orleans' key scheme), so clusters that share a Redis
/// keep apart as their storage does (the service id holds the cluster id). An entry of a dead silo is not swept:
/// Orleans' locator drops it when a lookup or a registration finds that membership has declared its silo dead, and
/// the next call activates the grain anew.
/// </para>
/// Every silo of a cluster must resolve the same way, which is why this is registered by <see cref="RedisCluster"/>
/// for all Redis silos alike and never by an attribute on the grains: the attribute would travel in the grain manifest
/// to the embedded silo and localhost clusters, which have no directory of that name.
/// </summary>
public static class RunDirectory
{
    public const string Name = "runs-redis";

    /// <summary>The grains kept in the Redis directory (by their class' full name, as the grain manifest holds it).</summary>
    public static readonly IReadOnlySet<string> Grains = new HashSet<string>(StringComparer.Ordinal)
    {
        typeof(RunGrain).FullName!, typeof(ParameterShardGrain).FullName!, typeof(RunRegistryGrain).FullName!,
    };

    public static ISiloBuilder AddRedisRunDirectory(this ISiloBuilder silo, RedisConnection redis)
    {
        silo.AddRedisGrainDirectory(Name, o => o.ConfigurationOptions = redis.Options());
        silo.Services.AddSingleton<IGrainDirectoryResolver, Resolver>();
        return silo;
    }

    private sealed class Resolver(IServiceProvider services) : IGrainDirectoryResolver
    {
        // Looked up on first use: the directory is built by the same container that builds Orleans' resolver, which asks for this one.
        private IGrainDirectory? _directory;

        public bool TryResolveGrainDirectory(GrainType grainType, GrainProperties? properties, [NotNullWhen(true)] out IGrainDirectory? grainDirectory)
        {
            if (properties is not null && properties.Properties.TryGetValue(WellKnownGrainTypeProperties.FullTypeName, out var name) && Grains.Contains(name))
            {
                // Orleans 10 registers a named directory as a keyed service (AddGrainDirectory).
                grainDirectory = _directory ??= services.GetRequiredKeyedService<IGrainDirectory>(Name);
                return true;
            }
            grainDirectory = null;
            return false;
        }
    }
}
