using System.CommandLine;
using System.Net;
using Backprop.Grains.Hosting;

namespace Backprop.Client;

/// <summary>
/// Where a running cluster is: a fixed list of gateways (the client fails over between them), or a Redis whose
/// membership table lists the live gateways. Exactly one of the two is set. With <see cref="Tls"/>, connections
/// to the gateways use TLS (the cluster's silos must too). <see cref="ConnectTimeout"/>: how long to keep trying to
/// reach it (null: one try).
/// </summary>
public sealed record ClusterAddress(IPEndPoint[] Gateways, RedisConnection? Redis, string ClusterId, TlsFiles? Tls = null, TimeSpan? ConnectTimeout = null)
{
    public const string DefaultGateway = "127.0.0.1:30000";

    /// <summary>How a user names this address again, e.g. in "re-attach with ..." hints.</summary>
    public string Flags => (Redis is not null ? $"--redis {Redis.Endpoint}" : $"--gateway {string.Join(',', Gateways.Select(g => g.ToString()))}")
        + (Redis?.Password is { Source: not RedisPassword.Env } p ? $" --redis-password-file {p.Source}" : "")
        + (Redis?.Tls is { } redisTls ? " " + redisTls.Flags : "")
        + $" --cluster-id {ClusterId}" + (Tls is not null ? " " + Tls.Flags : "");

    public string Description => Redis is not null
        ? $"cluster '{ClusterId}' via Redis {Redis.Endpoint}"
        : $"cluster '{ClusterId}' via gateway{(Gateways.Length > 1 ? "s" : "")} {string.Join(", ", Gateways.Select(g => g.ToString()))}";

    /// <summary>Parses "host:port[,host:port...]"; throws <see cref="ArgumentException"/> naming the option.</summary>
    public static IPEndPoint[] ParseGateways(string text) =>
        text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries) is { Length: > 0 } parts
            ? [.. parts.Select(p => LocalClustering.ParseEndpoint(p, "--gateway"))]
            : throw new ArgumentException($"--gateway: '{text}' names no host:port");
}

/// <summary>
/// The options every cluster command shares: --gateway, --redis, --redis-password-file, --redis-tls, --redis-ca, --cluster-id,
/// --tls-cert, --tls-key, --tls-ca, --tls-peer-name, --connect-timeout.
/// </summary>
public sealed class ClusterAddressOptions(string gatewayDescription)
{
    public Option<string?> Gateway { get; } = new("--gateway") { Description = gatewayDescription + " (host:port[,host:port...])" };

    public Option<string?> Redis { get; } = new("--redis")
    {
        Description = "Find the cluster's gateways through this Redis (host:port) [env BACKPROP_REDIS]",
        DefaultValueFactory = _ => Environment.GetEnvironmentVariable("BACKPROP_REDIS") is { Length: > 0 } v ? v : null,
    };

    public Option<string?> RedisPasswordFile { get; } = EnvOption("--redis-password-file", RedisPassword.FileEnv,
        $"With --redis: file whose first line is Redis' password; or the password itself in [env {RedisPassword.Env}]; never printed");

    public Option<bool> RedisTls { get; } = new("--redis-tls")
    {
        Description = $"With --redis: TLS to Redis; its certificate must name the --redis host [env {Backprop.Grains.Hosting.RedisTls.Env}]",
        DefaultValueFactory = _ => Backprop.Grains.Hosting.EnvironmentValue.Get(Backprop.Grains.Hosting.RedisTls.Env, "--redis-tls", false),
    };

    public Option<string?> RedisCa { get; } = EnvOption("--redis-ca", Backprop.Grains.Hosting.RedisTls.CaEnv,
        "With --redis-tls: PEM CA that signed Redis' certificate, the only one trusted (default: the system's CAs)");

    public Option<int?> ConnectTimeout { get; } = new("--connect-timeout")
    {
        Description = $"Seconds to keep trying to reach the cluster (Redis, then a gateway), with back-off, saying on stderr what it waits for; e.g. 600 for a Job started with its cluster [default: one try of {ClusterConnection.AttemptLimit.TotalSeconds:F0} s] [env {ConnectTimeoutEnv}]",
        DefaultValueFactory = _ => Backprop.Grains.Hosting.EnvironmentValue.Get<int?>(ConnectTimeoutEnv, "--connect-timeout", null),
    };

    public const string ConnectTimeoutEnv = "BACKPROP_CONNECT_TIMEOUT";

    public Option<string> ClusterId { get; } = new("--cluster-id")
    {
        Description = "Cluster id of the running cluster [env BACKPROP_CLUSTER_ID]",
        DefaultValueFactory = _ => Environment.GetEnvironmentVariable("BACKPROP_CLUSTER_ID") is { Length: > 0 } v ? v : LocalClustering.DefaultClusterId,
    };

    public Option<string?> TlsCert { get; } = EnvOption("--tls-cert", TlsFiles.CertEnv,
        "TLS to a cluster that requires it: the client certificate (PEM, with --tls-key; or a PFX without password)");

    public Option<string?> TlsKey { get; } = EnvOption("--tls-key", TlsFiles.KeyEnv, "TLS: the PEM private key of --tls-cert");

    public Option<string?> TlsCa { get; } = EnvOption("--tls-ca", TlsFiles.CaEnv, "TLS: PEM CA that signed the cluster's certificates (the only one trusted)");

    public Option<string?> TlsPeerName { get; } = EnvOption("--tls-peer-name", TlsFiles.PeerNameEnv,
        "TLS: DNS name the gateways' certificates must carry in their subject alternative names (instead of the address dialled)");

    /// <summary>Adds every option to <paramref name="command"/>, in the order help lists them.</summary>
    public void AddTo(Command command)
    {
        foreach (Option option in (Option[])[Gateway, Redis, RedisPasswordFile, ClusterId, TlsCert, TlsKey, TlsCa, TlsPeerName, RedisTls, RedisCa, ConnectTimeout])
            command.Add(option);
    }

    private static Option<string?> EnvOption(string flag, string env, string description) => new(flag)
    {
        Description = $"{description} [env {env}]",
        DefaultValueFactory = _ => Environment.GetEnvironmentVariable(env) is { Length: > 0 } v ? v : null,
    };

    /// <summary>The address given, else one at <paramref name="fallbackGateway"/>; null when neither is there (train's embedded silo).</summary>
    public ClusterAddress? Parse(ParseResult parse, string? fallbackGateway)
    {
        string? gateway = parse.GetValue(Gateway), redis = parse.GetValue(Redis);
        string clusterId = parse.GetValue(ClusterId)!;
        if (gateway is not null && redis is not null) throw new ArgumentException("--gateway and --redis: give one of them");
        gateway = redis is null ? gateway ?? fallbackGateway : null;
        // The embedded silo never uses TLS: the files are read only for a cluster.
        if (redis is null && gateway is null) return null;
        TimeSpan? connectTimeout = parse.GetValue(ConnectTimeout) is { } seconds
            ? seconds is >= 1 and <= 86400 ? TimeSpan.FromSeconds(seconds) : throw new ArgumentException($"--connect-timeout: {seconds} is outside 1..86400 seconds")
            : null;
        // The client's own certificate is optional here (a cluster with TLS refuses a client without one); its
        // chain is not checked against --tls-ca before connecting: the cluster judges it.
        var tls = TlsFiles.Load(parse.GetValue(TlsCert), parse.GetValue(TlsKey), parse.GetValue(TlsCa), parse.GetValue(TlsPeerName), silo: false);
        if (redis is not null)
        {
            var (host, port) = RedisConnection.ParseEndpoint(redis, "--redis");
            var connection = new RedisConnection(host, port, RedisPassword.Resolve(parse.GetValue(RedisPasswordFile)),
                Backprop.Grains.Hosting.RedisTls.Load(parse.GetValue(RedisTls), parse.GetValue(RedisCa)));
            return new ClusterAddress([], connection, clusterId, tls, connectTimeout);
        }
        if (parse.GetValue(RedisTls) || parse.GetValue(RedisCa) is not null) throw new ArgumentException("--redis-tls, --redis-ca: need --redis");
        return new ClusterAddress(ClusterAddress.ParseGateways(gateway!), null, clusterId, tls, connectTimeout);
    }
}
