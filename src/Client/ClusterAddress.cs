using System.CommandLine;
using System.Net;
using Backprop.Grains.Hosting;

namespace Backprop.Client;

/// <summary>
/// Where a running cluster is: a fixed list of gateways (the client fails over between them), or a Redis whose
/// membership table lists the live gateways. Exactly one of the two is set.
/// </summary>
public sealed record ClusterAddress(IPEndPoint[] Gateways, string? Redis, string ClusterId)
{
    public const string DefaultGateway = "127.0.0.1:30000";

    /// <summary>How a user names this address again, e.g. in "re-attach with ..." hints.</summary>
    public string Flags => (Redis is not null ? $"--redis {Redis}" : $"--gateway {string.Join(',', Gateways.Select(g => g.ToString()))}")
        + $" --cluster-id {ClusterId}";

    public string Description => Redis is not null
        ? $"cluster '{ClusterId}' via Redis {Redis}"
        : $"cluster '{ClusterId}' via gateway{(Gateways.Length > 1 ? "s" : "")} {string.Join(", ", Gateways.Select(g => g.ToString()))}";

    /// <summary>Parses "host:port[,host:port...]"; throws <see cref="ArgumentException"/> naming the option.</summary>
    public static IPEndPoint[] ParseGateways(string text) =>
        text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries) is { Length: > 0 } parts
            ? [.. parts.Select(p => LocalClustering.ParseEndpoint(p, "--gateway"))]
            : throw new ArgumentException($"--gateway: '{text}' names no host:port");
}

/// <summary>The options every cluster command shares: --gateway, --redis, --cluster-id.</summary>
public sealed class ClusterAddressOptions(string gatewayDescription)
{
    public Option<string?> Gateway { get; } = new("--gateway") { Description = gatewayDescription + " (host:port[,host:port...])" };

    public Option<string?> Redis { get; } = new("--redis")
    {
        Description = "Find the cluster's gateways through this Redis (host:port) [env BACKPROP_REDIS]",
        DefaultValueFactory = _ => Environment.GetEnvironmentVariable("BACKPROP_REDIS") is { Length: > 0 } v ? v : null,
    };

    public Option<string> ClusterId { get; } = new("--cluster-id")
    {
        Description = "Cluster id of the running cluster [env BACKPROP_CLUSTER_ID]",
        DefaultValueFactory = _ => Environment.GetEnvironmentVariable("BACKPROP_CLUSTER_ID") is { Length: > 0 } v ? v : LocalClustering.DefaultClusterId,
    };

    /// <summary>The address given, else one at <paramref name="fallbackGateway"/>; null when neither is there (train's embedded silo).</summary>
    public ClusterAddress? Parse(ParseResult parse, string? fallbackGateway)
    {
        string? gateway = parse.GetValue(Gateway), redis = parse.GetValue(Redis);
        string clusterId = parse.GetValue(ClusterId)!;
        if (gateway is not null && redis is not null) throw new ArgumentException("--gateway and --redis: give one of them");
        if (redis is not null)
        {
            LocalClustering.ParseEndpoint(redis, "--redis");
            return new ClusterAddress([], redis, clusterId);
        }
        gateway ??= fallbackGateway;
        return gateway is null ? null : new ClusterAddress(ClusterAddress.ParseGateways(gateway), null, clusterId);
    }
}
