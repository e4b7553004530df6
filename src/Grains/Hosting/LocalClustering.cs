using System.Net;
using Orleans.Configuration;

namespace Backprop.Grains.Hosting;

/// <summary>Membership settings a user may tune: how fast a dead silo is declared dead.</summary>
public sealed record MembershipSettings(TimeSpan ProbeTimeout, int MissedProbesLimit, int VotesForDeath)
{
    /// <summary>Orleans' defaults declare death after 11-15 s; these take about 1 s on loopback (ORLEANS-10-FACTS).</summary>
    public static readonly MembershipSettings Fast = new(TimeSpan.FromSeconds(1), 2, 1);
}

/// <summary>
/// Localhost clustering: silos on one machine (loopback only) form a cluster around a primary silo.
/// For development and tests; the primary is a single point of failure.
/// </summary>
public static class LocalClustering
{
    public const string DefaultClusterId = "backprop-dev";
    public const string ServiceId = "backprop-distributed";

    public static ISiloBuilder UseLocalCluster(this ISiloBuilder silo, string clusterId, int siloPort, int gatewayPort,
        IPEndPoint? primary, MembershipSettings membership)
    {
        silo.UseLocalhostClustering(siloPort, gatewayPort, primary, ServiceId, clusterId);
        silo.Configure<ClusterMembershipOptions>(o =>
        {
            o.ProbeTimeout = membership.ProbeTimeout;
            o.NumMissedProbesLimit = membership.MissedProbesLimit;
            o.NumVotesForDeathDeclaration = membership.VotesForDeath;
        });
        return silo;
    }

    /// <summary>Parses "host:port" (host defaults to 127.0.0.1); throws <see cref="ArgumentException"/> naming the option.</summary>
    public static IPEndPoint ParseEndpoint(string text, string option)
    {
        int colon = text.LastIndexOf(':');
        string host = colon > 0 ? text[..colon] : "127.0.0.1";
        string portText = colon >= 0 ? text[(colon + 1)..] : text;
        if (!int.TryParse(portText, out int port) || port < 1 || port > 65535)
            throw new ArgumentException($"{option}: '{text}' is not host:port with a port in 1..65535");
        if (host == "localhost") host = "127.0.0.1";
        if (!IPAddress.TryParse(host, out var address))
        {
            var resolved = Dns.GetHostAddresses(host).FirstOrDefault(a => a.AddressFamily == System.Net.Sockets.AddressFamily.InterNetwork)
                ?? throw new ArgumentException($"{option}: cannot resolve host '{host}'");
            address = resolved;
        }
        return new IPEndPoint(address, port);
    }

    /// <summary>A TCP port on loopback that is free right now.</summary>
    public static int FreePort()
    {
        using var listener = new System.Net.Sockets.TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }
}
