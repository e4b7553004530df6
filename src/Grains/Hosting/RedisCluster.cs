using System.Net;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Orleans.Configuration;
using Orleans.Serialization;
using Orleans.Storage;
using StackExchange.Redis;

namespace Backprop.Grains.Hosting;

/// <summary>
/// Redis clustering: membership, grain storage and reminders in one Redis. No silo is special (unlike
/// localhost clustering's primary), so any silo may die, and runs survive a restart of the whole cluster.
/// </summary>
public static class RedisCluster
{
    /// <summary>
    /// The service id of a Redis cluster. Orleans keys storage (<c>{ServiceId}/state/...</c>) and reminders
    /// (<c>{ServiceId}/reminders</c>) by service id only, so putting the cluster id in it keeps several
    /// clusters in one Redis apart. Clients that find gateways through Redis must use the same one.
    /// No '/': Orleans' Kubernetes hosting selects the cluster's pods by the label orleans/serviceId, and label
    /// values allow only letters, digits, '-', '_' and '.'.
    /// </summary>
    public static string ServiceIdOf(string clusterId) => $"{LocalClustering.ServiceId}-{clusterId}";

    /// <summary><paramref name="advertised"/> null: the ports only, the address is set elsewhere (Kubernetes hosting: the pod's IP).</summary>
    public static ISiloBuilder UseRedisCluster(this ISiloBuilder silo, string redis, string clusterId, IPAddress? advertised,
        int siloPort, int gatewayPort, MembershipSettings membership)
    {
        var endpoint = LocalClustering.ParseEndpoint(redis, "--redis");
        silo.Configure<ClusterOptions>(o => { o.ClusterId = clusterId; o.ServiceId = ServiceIdOf(clusterId); });
        // Bind where we advertise: on one machine several silos may share ports on distinct loopback addresses.
        if (advertised is not null) silo.ConfigureEndpoints(advertised, siloPort, gatewayPort, listenOnAnyHostAddress: false);
        else silo.Configure<EndpointOptions>(o => { o.SiloPort = siloPort; o.GatewayPort = gatewayPort; });
        silo.UseRedisClustering(o => o.ConfigurationOptions = Options(endpoint));
        silo.AddRedisGrainStorage(SiloSetup.StorageName, b => b.Configure<IServiceProvider>((o, services) =>
        {
            o.ConfigurationOptions = Options(endpoint);
            // Orleans' own binary format: parameter vectors are FloatPayloads with their own codec, which JSON would spell out float by float.
            o.GrainStorageSerializer = new OrleansGrainStorageSerializer(services.GetRequiredService<Serializer>());
        }));
        silo.UseRedisReminderService(o => o.ConfigurationOptions = Options(endpoint));
        membership.ApplyTo(silo);
        return silo;
    }

    /// <summary>Redis client settings for Orleans' providers: fail the start when Redis is not there, instead of retrying forever.</summary>
    public static ConfigurationOptions Options(IPEndPoint redis) => new()
    {
        EndPoints = { redis },
        AbortOnConnectFail = true,
        ConnectTimeout = 5000,
    };
}
