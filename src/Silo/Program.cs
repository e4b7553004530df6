using System.CommandLine;
using Backprop.Core.Data;
using Backprop.Grains.Hosting;
using Backprop.Silo;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Orleans.Configuration;

// The silo host: one process of a Backprop cluster. Every option also reads an environment variable,
// so containers and scripts can configure it without a command line.

var clusterId = Opt("--cluster-id", "BACKPROP_CLUSTER_ID", LocalClustering.DefaultClusterId, "Cluster id; silos and clients must agree");
var siloPort = Opt("--silo-port", "BACKPROP_SILO_PORT", 11111, "Port for silo-to-silo traffic (on --host)");
var gatewayPort = Opt("--gateway-port", "BACKPROP_GATEWAY_PORT", 30000, "Port clients connect to (on --host)");
var primary = Opt("--primary", "BACKPROP_PRIMARY", "", "Localhost clustering: silo endpoint (host:port) of the primary silo; empty = this silo is the primary");
var redis = Opt("--redis", "BACKPROP_REDIS", "", "Redis (host:port) for membership, grain storage and reminders; empty = localhost clustering");
var redisPasswordFile = Opt("--redis-password-file", RedisPassword.FileEnv, "", $"Redis AUTH: file whose first line is the password (a mounted Secret); or the password itself in [env {RedisPassword.Env}]; never printed");
var hostAddress = Opt("--host", "BACKPROP_HOST", "127.0.0.1", "IP address this silo binds and advertises (silo and gateway ports); with --kubernetes the pod's IP is used instead");
var kubernetes = Opt("--kubernetes", "BACKPROP_KUBERNETES", false, "Running in a Kubernetes pod (needs --redis): advertise the pod's IP (POD_IP), listen on all its addresses, name the silo after the pod (POD_NAME, POD_NAMESPACE); Orleans then marks silos whose pod is gone as dead");
var dataDir = Opt("--data-dir", "BACKPROP_DATA", DatasetCatalog.DefaultDataDir(), "Directory holding datasets (fetched there when missing)");
var name = Opt("--name", "BACKPROP_SILO_NAME", "", "Name shown in logs (default silo-<silo port>; with --kubernetes the pod's name, POD_NAME)");
var probeTimeout = Opt("--probe-timeout", "BACKPROP_PROBE_TIMEOUT", MembershipSettings.Fast.ProbeTimeout.TotalSeconds, "Membership probe timeout, seconds");
var missedProbes = Opt("--missed-probes", "BACKPROP_MISSED_PROBES", MembershipSettings.Fast.MissedProbesLimit, "Missed probes before a silo is suspected");
var deathVotes = Opt("--death-votes", "BACKPROP_DEATH_VOTES", MembershipSettings.Fast.VotesForDeath, "Suspicions needed to declare a silo dead (fewer where the cluster is small)");
var role = Opt("--role", "BACKPROP_ROLE", "all", "server (run coordinators, parameter servers, run registry), worker (worker grains) or all (both)");
var httpPort = Opt("--http-port", "BACKPROP_HTTP_PORT", 0, "Port of /healthz and /readyz (HTTP); 0 = none");
var httpBind = Opt("--http-bind", "BACKPROP_HTTP_BIND", "127.0.0.1", "Address /healthz and /readyz listen on (0.0.0.0 in a pod, for the kubelet's probes)");
var dataset = Opt("--dataset", "BACKPROP_DATASET", "mnist", "Data set a worker silo loads at start; /readyz waits for it");
var workerThreads = Opt("--worker-threads", "BACKPROP_WORKER_THREADS", 1, "Threads each worker grain uses for a chunk (results do not depend on it)");
var tlsCert = Opt("--tls-cert", TlsFiles.CertEnv, "", "TLS with mutual authentication: this silo's certificate (PEM, with --tls-key; or a PFX without password)");
var tlsKey = Opt("--tls-key", TlsFiles.KeyEnv, "", "TLS: the PEM private key of --tls-cert");
var tlsCa = Opt("--tls-ca", TlsFiles.CaEnv, "", "TLS: PEM CA that signed every silo's and client's certificate (the only one trusted)");
var tlsPeerName = Opt("--tls-peer-name", TlsFiles.PeerNameEnv, "", "TLS: DNS name every silo's certificate carries in its subject alternative names; silos are checked against it instead of the IP address dialled (Kubernetes: pod IPs change)");

var root = new RootCommand("Backprop.Distributed silo: hosts run coordinators, parameter servers and workers")
{
    clusterId, siloPort, gatewayPort, primary, redis, redisPasswordFile, hostAddress, kubernetes, dataDir, name, probeTimeout, missedProbes, deathVotes, role, httpPort, httpBind, dataset, workerThreads,
    tlsCert, tlsKey, tlsCa, tlsPeerName,
};
root.SetAction(async (parse, cancel) =>
{
    int silo = parse.GetValue(siloPort), gateway = parse.GetValue(gatewayPort);
    bool inPod = parse.GetValue(kubernetes);
    // Orleans' Kubernetes hosting needs the silo named after its pod.
    string siloName = parse.GetValue(name) is { Length: > 0 } n ? n
        : inPod && Environment.GetEnvironmentVariable("POD_NAME") is { Length: > 0 } pod ? pod : $"silo-{silo}";
    System.Net.IPEndPoint? primaryEndpoint;
    string? redisEndpoint = parse.GetValue(redis) is { Length: > 0 } r ? r : null;
    System.Net.IPAddress? advertised;
    SiloRole siloRole;
    System.Net.IPAddress? healthBind;
    TlsFiles? tls;
    RedisPassword? redisPassword = null;
    try
    {
        siloRole = SiloRoles.Parse(parse.GetValue(role)!);
        if (silo is < 1 or > 65535 || gateway is < 1 or > 65535) throw new ArgumentException("ports must be in 1..65535");
        if (parse.GetValue(probeTimeout) is <= 0 or > 600) throw new ArgumentException("--probe-timeout must be in (0, 600] seconds");
        if (parse.GetValue(missedProbes) < 1 || parse.GetValue(deathVotes) < 1) throw new ArgumentException("--missed-probes and --death-votes must be at least 1");
        if (parse.GetValue(httpPort) is < 0 or > 65535) throw new ArgumentException("--http-port must be in 0..65535");
        if (!System.Net.IPAddress.TryParse(parse.GetValue(httpBind), out healthBind)) throw new ArgumentException($"--http-bind: '{parse.GetValue(httpBind)}' is not an IP address");
        Backprop.Core.Data.DatasetCatalog.Get(parse.GetValue(dataset)!);
        if (parse.GetValue(workerThreads) is < 1 or > 256) throw new ArgumentException("--worker-threads must be in 1..256");
        primaryEndpoint = parse.GetValue(primary) is { Length: > 0 } p ? LocalClustering.ParseEndpoint(p, "--primary") : null;
        if (redisEndpoint is not null)
        {
            // Redis has no primary: every silo finds the others through the membership table.
            if (primaryEndpoint is not null) throw new ArgumentException("--primary: not with --redis (Redis clustering has no primary)");
            LocalClustering.ParseEndpoint(redisEndpoint, "--redis");
            redisPassword = RedisPassword.Resolve(parse.GetValue(redisPasswordFile));
        }
        else if (parse.GetValue(kubernetes))
        {
            throw new ArgumentException("--kubernetes: needs --redis (localhost clustering is for one machine)");
        }
        if (!System.Net.IPAddress.TryParse(parse.GetValue(hostAddress), out advertised)) throw new ArgumentException($"--host: '{parse.GetValue(hostAddress)}' is not an IP address");
        tls = TlsFiles.Load(parse.GetValue(tlsCert), parse.GetValue(tlsKey), parse.GetValue(tlsCa), parse.GetValue(tlsPeerName), silo: true);
    }
    catch (ArgumentException e)
    {
        Console.Error.WriteLine($"error: {e.Message}");
        return 2;
    }
    var membership = new MembershipSettings(TimeSpan.FromSeconds(parse.GetValue(probeTimeout)), parse.GetValue(missedProbes), parse.GetValue(deathVotes));

    var builder = Host.CreateApplicationBuilder();
    builder.Logging.ClearProviders();
    builder.Logging.AddConsole(o => o.FormatterName = SiloLogFormatter.FormatterName)
        .AddConsoleFormatter<SiloLogFormatter, SiloLogOptions>(o => o.SiloName = siloName);
    builder.Logging.AddFilter("Orleans", LogLevel.Warning);
    builder.UseOrleans(s =>
    {
        // First, so that the cluster id and service id set below win over its ORLEANS_CLUSTER_ID and ORLEANS_SERVICE_ID;
        // with no address configured it advertises the pod's IP (POD_IP) and listens on all of the pod's addresses.
        if (inPod) s.UseKubernetesHosting();
        if (redisEndpoint is not null)
        {
            s.UseRedisCluster(redisEndpoint, parse.GetValue(clusterId)!, inPod ? null : advertised, silo, gateway, membership, redisPassword);
        }
        else
        {
            s.UseLocalCluster(parse.GetValue(clusterId)!, silo, gateway, primaryEndpoint, membership, advertised);
            // Localhost clustering is for experiments on one machine: runs last as long as the silo holding them. Orleans'
            // binary format, as for Redis and files: the default JSON does not read a run's record back.
            s.AddMemoryGrainStorage(SiloSetup.StorageName, b => b.Configure<IServiceProvider>((o, services) =>
                o.GrainStorageSerializer = new Orleans.Storage.OrleansGrainStorageSerializer(services.GetRequiredService<Orleans.Serialization.Serializer>())));
        }
        s.Configure<SiloOptions>(o => o.SiloName = siloName);
        s.AddBackpropGrains(parse.GetValue(dataDir)!, threadsPerWorker: parse.GetValue(workerThreads), role: siloRole);
        if (tls is not null) s.UseBackpropTls(tls);
    });
    builder.Services.AddHostedService<MembershipLog>();
    builder.Services.AddSingleton<SiloHealth>();
    using var host = builder.Build();
    var log = host.Services.GetRequiredService<ILoggerFactory>().CreateLogger(siloName);
    var health = host.Services.GetRequiredService<SiloHealth>();
    // The health endpoints first and last: live (and saying why not ready) while the data set loads and the silo
    // joins, and until it has left the cluster; a Kubernetes startup probe on /healthz covers the start.
    var healthServer = parse.GetValue(httpPort) > 0 ? new HealthServer(health, healthBind!, parse.GetValue(httpPort)) : null;
    if (healthServer is not null)
    {
        try
        {
            await healthServer.StartAsync(cancel);
        }
        catch (IOException e)
        {
            Console.Error.WriteLine($"error: --http-port: cannot listen on {healthBind}:{parse.GetValue(httpPort)}: {e.Message.ReplaceLineEndings(" ")}");
            return 1;
        }
    }
    try
    {
        // The data set is loaded before the silo joins: a worker silo gets chunks as soon as membership lists it as
        // active, and coordinators (server silos) plan steps and evaluations from it too. A set that fails to load
        // leaves the silo joining anyway, not ready (/readyz says why), so that the failure is visible.
        health.LoadDataset(parse.GetValue(dataset)!);
        await health.DatasetLoaded();
        health.Joining();
        host.Services.GetRequiredService<IHostApplicationLifetime>().ApplicationStopping.Register(health.Leaving);
        try
        {
            await host.StartAsync(cancel);
            health.Started();
        }
        catch (Exception e) when (!cancel.IsCancellationRequested)
        {
            // One line on stderr, for scripts and for a pod's last state: above all, Redis refusing the connection
            // (not there, or the password missing or wrong; StackExchange.Redis' messages never hold the password).
            // Orleans' Redis providers wrap StackExchange.Redis' exception in their own (RedisRemindersException,
            // RedisClusteringException), at times as text only.
            var redisError = Causes(e).FirstOrDefault(c => c is StackExchange.Redis.RedisConnectionException || c.GetType().Name.StartsWith("Redis", StringComparison.Ordinal));
            string why = redisError is not null
                ? $"cannot connect to Redis {redisEndpoint}{(redisPassword is null ? " (no password given)" : $" ({redisPassword})")}: "
                    + redisError.Message.Replace("StackExchange.Redis.RedisConnectionException: ", "")
                : $"the silo did not start: {Causes(e).Last().Message}";
            Console.Error.WriteLine($"error: {why.ReplaceLineEndings(" ")}");
            return 1;
        }
        string membershipText = redisEndpoint is not null ? $"redis {redisEndpoint}" : $"primary {primaryEndpoint?.ToString() ?? "self"}";
        log.LogInformation("{Silo} up: role {Role}, cluster {Cluster}, host {Host}, silo port {SiloPort}, gateway port {GatewayPort}, {Membership}, data {DataDir}, pid {Pid}",
            siloName, siloRole.ToString().ToLowerInvariant(), parse.GetValue(clusterId), inPod ? "pod IP" : advertised, silo, gateway, membershipText, parse.GetValue(dataDir), Environment.ProcessId);
        if (tls is not null) log.LogInformation("{Silo} {Tls}", siloName, tls.Description);
        await host.WaitForShutdownAsync(CancellationToken.None);
        log.LogInformation("{Silo} stopped", siloName);
        return 0;
    }
    finally
    {
        // After the silo has left: /healthz answered all along, /readyz said "leaving".
        if (healthServer is not null) await healthServer.StopAsync(CancellationToken.None);
    }
});

var result = root.Parse(args);
if (result.Errors.Count > 0)
{
    Console.Error.WriteLine($"error: {result.Errors[0].Message} (see --help)");
    return 2;
}
return await result.InvokeAsync();

static IEnumerable<Exception> Causes(Exception e)
{
    // An AggregateException's InnerException is its first: enough to find the cause of a failed start.
    for (Exception? c = e; c is not null; c = c.InnerException) yield return c;
}

static Option<T> Opt<T>(string flag, string env, T fallback, string description) => new(flag)
{
    Description = $"{description} [env {env}]",
    DefaultValueFactory = _ => Environment.GetEnvironmentVariable(env) is { Length: > 0 } v
        ? (T)Convert.ChangeType(v, typeof(T), System.Globalization.CultureInfo.InvariantCulture)
        : fallback,
};
