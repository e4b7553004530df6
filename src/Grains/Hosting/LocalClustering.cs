using System.Net;
using Orleans.Configuration;

namespace Backprop.Grains.Hosting;

/// <summary>
/// Membership settings a user may tune: how fast a dead silo is declared dead, and how many silos must agree.
/// Orleans needs min(VotesForDeath, (active silos + 1) / 2) votes, so 2 votes still lets one peer decide in a
/// 2-silo cluster, and asks for a second opinion (the indirect probe's intermediary counts) from 3 silos on.
/// </summary>
public sealed record MembershipSettings(TimeSpan ProbeTimeout, int MissedProbesLimit, int VotesForDeath)
{
    /// <summary>
    /// Orleans' defaults declare death after 11-15 s. These aim at about 2 s on loopback while tolerating a
    /// silo that is slow but alive on a loaded 2-core machine: 3 missed probes of 1 s each, and 2 votes where
    /// the cluster is big enough (README "Membership settings" has the measurements).
    /// </summary>
    public static readonly MembershipSettings Fast = new(TimeSpan.FromSeconds(1), 3, 2);

    /// <summary>The timeouts that go with these settings; the same for every kind of clustering.</summary>
    public ISiloBuilder ApplyTo(ISiloBuilder silo) => silo.Configure<ClusterMembershipOptions>(o =>
    {
        o.ProbeTimeout = ProbeTimeout;
        o.NumMissedProbesLimit = MissedProbesLimit;
        o.NumVotesForDeathDeclaration = VotesForDeath;
        // A silo whose IAmAlive is older than 2 x this counts as stale: it no longer counts towards the quorum
        // and is probed by everyone. Default 30 s.
        o.IAmAliveTablePublishTimeout = TimeSpan.FromSeconds(5);
        // Gossip carries a death at once; the table read is the fallback when gossip is lost. Default 60 s.
        o.TableRefreshTimeout = TimeSpan.FromSeconds(5);
        // Votes must come from one episode: a vote from an unrelated hiccup minutes ago must not make a
        // second, unrelated suspicion fatal. Default 2 min; 20 s is several detection windows.
        o.DeathVoteExpirationTimeout = TimeSpan.FromSeconds(20);
    });
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
        IPEndPoint? primary, MembershipSettings membership, IPAddress? host = null)
    {
        silo.UseLocalhostClustering(siloPort, gatewayPort, primary, ServiceId, clusterId);
        // Orleans' localhost clustering binds 127.0.0.1; another loopback address lets several silos share ports like separate machines.
        if (host is not null) silo.ConfigureEndpoints(host, siloPort, gatewayPort, listenOnAnyHostAddress: false);
        return membership.ApplyTo(silo);
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
