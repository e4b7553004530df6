using System.CommandLine;
using Backprop.Core.Data;
using Backprop.Grains;
using Backprop.Grains.Hosting;
using Backprop.Silo;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Orleans.Configuration;
using Orleans.Dashboard;

// The silo host: one process of a Backprop cluster. Every option also reads an environment variable,
// so containers and scripts can configure it without a command line.

var clusterId = Opt("--cluster-id", "BACKPROP_CLUSTER_ID", LocalClustering.DefaultClusterId, "Cluster id; silos and clients must agree");
var siloPort = Opt("--silo-port", "BACKPROP_SILO_PORT", 11111, "Port for silo-to-silo traffic (on --host)");
var gatewayPort = Opt("--gateway-port", "BACKPROP_GATEWAY_PORT", 30000, "Port clients connect to (on --host)");
var lanePort = Opt("--lane-port", "BACKPROP_LANE_PORT", 0, "Port of the data lane (on --host): other silos' workers push gradients to this silo's parameter-server shards and pull parameters through it, beside Orleans' connection; 0 = any free port (announced in the shards' replies), -1 = none (all through Orleans); with --tls-cert the lane is TLS too");
var primary = Opt("--primary", "BACKPROP_PRIMARY", "", "Localhost clustering: silo endpoint (host:port) of the primary silo; empty = this silo is the primary");
var redis = Opt("--redis", "BACKPROP_REDIS", "", "Redis (host:port) for membership, grain storage and reminders; empty = localhost clustering");
var redisPasswordFile = Opt("--redis-password-file", RedisPassword.FileEnv, "", $"Redis AUTH: file whose first line is the password (a mounted Secret); or the password itself in [env {RedisPassword.Env}]; never printed");
var redisTls = Opt("--redis-tls", RedisTls.Env, false, "TLS to Redis (its tls-port, with tls-auth-clients no or optional): Redis' certificate must name the --redis host");
var redisCa = Opt("--redis-ca", RedisTls.CaEnv, "", "With --redis-tls: PEM CA that signed Redis' certificate, the only one trusted (default: the system's CAs)");
var redisWait = Opt("--redis-wait", "BACKPROP_REDIS_WAIT", 300, "Seconds to wait at start for Redis to answer (tries with back-off, one log line each); then exit 1. A refused password or certificate fails at once");
var hostAddress = Opt("--host", "BACKPROP_HOST", "127.0.0.1", "IP address this silo binds and advertises (silo and gateway ports); with --kubernetes the pod's IP is used instead");
var kubernetes = Opt("--kubernetes", "BACKPROP_KUBERNETES", false, "Running in a Kubernetes pod (needs --redis): advertise the IP address in POD_IP (required; the downward API's status.podIP), listen on all the pod's addresses, name the silo after POD_NAME");
var shutdownTimeout = Opt("--shutdown-timeout", "BACKPROP_SHUTDOWN_TIMEOUT", 30, $"Seconds a stopping silo (SIGTERM, Ctrl+C) has to leave the cluster: hand its grains over, checkpoint its parameter-server shards; the process ends at the latest {ShutdownGrace.TotalSeconds:F0} s after that (a pod's terminationGracePeriodSeconds must be longer)");
var dataDir = Opt("--data-dir", "BACKPROP_DATA", DatasetCatalog.DefaultDataDir(), "Directory holding datasets (fetched there when missing)");
var name = Opt("--name", "BACKPROP_SILO_NAME", "", "Name of the silo in membership and logs (default silo-<silo port>; with --kubernetes POD_NAME, else the host name)");
var probeTimeout = Opt("--probe-timeout", "BACKPROP_PROBE_TIMEOUT", MembershipSettings.Fast.ProbeTimeout.TotalSeconds, "Membership probe timeout, seconds");
var missedProbes = Opt("--missed-probes", "BACKPROP_MISSED_PROBES", MembershipSettings.Fast.MissedProbesLimit, "Missed probes before a silo is suspected");
var deathVotes = Opt("--death-votes", "BACKPROP_DEATH_VOTES", MembershipSettings.Fast.VotesForDeath, "Suspicions needed to declare a silo dead (fewer where the cluster is small)");
var role = Opt("--role", "BACKPROP_ROLE", "all", "server (run coordinators, parameter servers, run registry), worker (worker grains) or all (both)");
var httpPort = Opt("--http-port", "BACKPROP_HTTP_PORT", 0, "Port of the silo's read-only web server (HTTP): /healthz, /readyz, /metrics (Prometheus), the run page at /, the Orleans Dashboard at /dashboard; 0 = none");
var httpBind = Opt("--http-bind", "BACKPROP_HTTP_BIND", "127.0.0.1", "Address the web server listens on (0.0.0.0 in a pod, for the kubelet's probes and Prometheus)");
var dataset = Opt("--dataset", "BACKPROP_DATASET", "mnist", "Data set a worker silo loads at start (mnist, fashion-mnist or the absolute path of a folder of your own); /readyz waits for it");
var workerThreads = Opt("--worker-threads", "BACKPROP_WORKER_THREADS", 1, "Threads each worker grain uses for a chunk (results do not depend on it)");
var keepFinishedRuns = Opt("--keep-finished-runs", "BACKPROP_KEEP_FINISHED_RUNS", Retention.DefaultRuns, "Finished runs kept (record, checkpoints, final model); the oldest beyond are deleted");
var keepFinishedDays = Opt("--keep-finished-days", "BACKPROP_KEEP_FINISHED_DAYS", Retention.DefaultAge.TotalDays, "Days a finished run is kept after its last update; older ones are deleted");
var keepFinishedMinAge = Opt("--keep-finished-min-age", "BACKPROP_KEEP_FINISHED_MIN_AGE", Retention.DefaultMinAge.TotalSeconds, "Seconds a finished run is kept at least, whatever --keep-finished-runs says (a client may still fetch its model)");
var tlsCert = Opt("--tls-cert", TlsFiles.CertEnv, "", "TLS with mutual authentication: this silo's certificate (PEM, with --tls-key; or a PFX without password)");
var tlsKey = Opt("--tls-key", TlsFiles.KeyEnv, "", "TLS: the PEM private key of --tls-cert");
var tlsCa = Opt("--tls-ca", TlsFiles.CaEnv, "", "TLS: PEM CA that signed every silo's and client's certificate (the only one trusted)");
var tlsPeerName = Opt("--tls-peer-name", TlsFiles.PeerNameEnv, "", "TLS: DNS name every silo's certificate carries in its subject alternative names; silos are checked against it instead of the IP address dialled (Kubernetes: pod IPs change)");

var root = new RootCommand("Backprop.Distributed silo: hosts run coordinators, parameter servers and workers")
{
    clusterId, siloPort, gatewayPort, lanePort, primary, redis, redisPasswordFile, redisTls, redisCa, redisWait, hostAddress, kubernetes, shutdownTimeout, dataDir, name,
    probeTimeout, missedProbes, deathVotes, role, httpPort, httpBind, dataset, workerThreads, keepFinishedRuns, keepFinishedDays, keepFinishedMinAge, tlsCert, tlsKey, tlsCa, tlsPeerName,
};
root.SetAction(async (parse, cancel) =>
{
    int silo = parse.GetValue(siloPort), gateway = parse.GetValue(gatewayPort);
    bool inPod = parse.GetValue(kubernetes);
    string siloName = parse.GetValue(name) is { Length: > 0 } n ? n
        : inPod ? Environment.GetEnvironmentVariable("POD_NAME") is { Length: > 0 } pod ? pod : Environment.MachineName
        : $"silo-{silo}";
    System.Net.IPEndPoint? primaryEndpoint;
    RedisConnection? redisConnection = null;
    System.Net.IPAddress? advertised;
    SiloRole siloRole;
    System.Net.IPAddress? healthBind;
    TlsFiles? tls;
    Retention retention;
    try
    {
        siloRole = SiloRoles.Parse(parse.GetValue(role)!);
        if (silo is < 1 or > 65535 || gateway is < 1 or > 65535) throw new ArgumentException("ports must be in 1..65535");
        if (parse.GetValue(lanePort) is < -1 or > 65535) throw new ArgumentException("--lane-port must be in -1..65535 (0: any free port, -1: none)");
        if (parse.GetValue(probeTimeout) is <= 0 or > 600) throw new ArgumentException("--probe-timeout must be in (0, 600] seconds");
        if (parse.GetValue(missedProbes) < 1 || parse.GetValue(deathVotes) < 1) throw new ArgumentException("--missed-probes and --death-votes must be at least 1");
        if (parse.GetValue(httpPort) is < 0 or > 65535) throw new ArgumentException("--http-port must be in 0..65535");
        if (parse.GetValue(shutdownTimeout) is < 1 or > MaxShutdownSeconds) throw new ArgumentException($"--shutdown-timeout must be in 1..{MaxShutdownSeconds} seconds");
        if (parse.GetValue(redisWait) is < 0 or > 86400) throw new ArgumentException("--redis-wait must be in 0..86400 seconds");
        if (!System.Net.IPAddress.TryParse(parse.GetValue(httpBind), out healthBind)) throw new ArgumentException($"--http-bind: '{parse.GetValue(httpBind)}' is not an IP address");
        Backprop.Core.Data.DatasetCatalog.Validate(parse.GetValue(dataset)!);
        if (parse.GetValue(workerThreads) is < 1 or > Backprop.Core.ResourceLimits.MaxThreadsPerWorker)
            throw new ArgumentException($"--worker-threads must be in 1..{Backprop.Core.ResourceLimits.MaxThreadsPerWorker}");
        double keepDays = parse.GetValue(keepFinishedDays);
        if (!(keepDays > 0 && keepDays <= 36_500)) throw new ArgumentException("--keep-finished-days must be in (0, 36500]");
        double minAge = parse.GetValue(keepFinishedMinAge);
        if (!(minAge >= 0 && minAge <= keepDays * 86_400)) throw new ArgumentException("--keep-finished-min-age must be in 0..--keep-finished-days (in seconds)");
        retention = new Retention(parse.GetValue(keepFinishedRuns), TimeSpan.FromDays(keepDays), TimeSpan.FromSeconds(minAge));
        retention.Validate();
        primaryEndpoint = parse.GetValue(primary) is { Length: > 0 } p ? LocalClustering.ParseEndpoint(p, "--primary") : null;
        if (parse.GetValue(redis) is { Length: > 0 } r)
        {
            // Redis has no primary: every silo finds the others through the membership table.
            if (primaryEndpoint is not null) throw new ArgumentException("--primary: not with --redis (Redis clustering has no primary)");
            var (redisHost, redisPort) = RedisConnection.ParseEndpoint(r, "--redis");
            redisConnection = new RedisConnection(redisHost, redisPort, RedisPassword.Resolve(parse.GetValue(redisPasswordFile)),
                RedisTls.Load(parse.GetValue(redisTls), parse.GetValue(redisCa)));
        }
        else if (inPod)
        {
            throw new ArgumentException("--kubernetes: needs --redis (localhost clustering is for one machine)");
        }
        else if (parse.GetValue(redisTls) || parse.GetValue(redisCa) is { Length: > 0 })
        {
            throw new ArgumentException("--redis-tls, --redis-ca: need --redis");
        }
        advertised = inPod ? PodAddress()
            : System.Net.IPAddress.TryParse(parse.GetValue(hostAddress), out var h) ? h
            : throw new ArgumentException($"--host: '{parse.GetValue(hostAddress)}' is not an IP address");
        tls = TlsFiles.Load(parse.GetValue(tlsCert), parse.GetValue(tlsKey), parse.GetValue(tlsCa), parse.GetValue(tlsPeerName), silo: true);
    }
    catch (ArgumentException e)
    {
        Console.Error.WriteLine($"error: {e.Message}");
        return 2;
    }
    var membership = new MembershipSettings(TimeSpan.FromSeconds(parse.GetValue(probeTimeout)), parse.GetValue(missedProbes), parse.GetValue(deathVotes));

    var builder = Host.CreateApplicationBuilder();
    builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(parse.GetValue(shutdownTimeout)));
    // SIGTERM and Ctrl+C belong to the command (its `cancel`, see InvokeAsync below), in every phase: .NET runs only the
    // last registered signal handler that cancels, so a host's console lifetime would take them from the command while
    // it runs, and leave them to it while it is not started.
    builder.Services.AddSingleton<IHostLifetime, SignalsToCommand>();
    builder.Logging.ClearProviders();
    builder.Logging.AddConsole(o => o.FormatterName = SiloLogFormatter.FormatterName)
        .AddConsoleFormatter<SiloLogFormatter, SiloLogOptions>(o => o.SiloName = siloName);
    builder.Logging.AddFilter("Orleans", LogLevel.Warning);
    // Orleans' placement retries log each attempt through Polly at information level (the dashboard's grains at start).
    builder.Logging.AddFilter("Polly", LogLevel.Warning);
    builder.UseOrleans(s =>
    {
        if (redisConnection is not null)
        {
            s.UseRedisCluster(redisConnection, parse.GetValue(clusterId)!, advertised, listenOnAnyAddress: inPod, silo, gateway, membership);
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
        s.AddBackpropGrains(parse.GetValue(dataDir)!, threadsPerWorker: parse.GetValue(workerThreads), role: siloRole, retention: retention,
            lanePort: parse.GetValue(lanePort));
        if (tls is not null) s.UseBackpropTls(tls);
        // The dashboard profiles every grain call: only where its page is served.
        if (parse.GetValue(httpPort) > 0) s.AddDashboard();
    });
    builder.Services.AddHostedService<MembershipLog>();
    if (Environment.GetEnvironmentVariable(ShutdownWorkHook.Env) is { Length: > 0 } work)
        builder.Services.AddHostedService(sp => new ShutdownWorkHook(TimeSpan.FromSeconds(double.Parse(work, System.Globalization.CultureInfo.InvariantCulture)), sp.GetRequiredService<ILogger<ShutdownWorkHook>>()));
    builder.Services.AddSingleton<SiloHealth>();
    using var host = builder.Build();
    var log = host.Services.GetRequiredService<ILoggerFactory>().CreateLogger(siloName);
    var health = host.Services.GetRequiredService<SiloHealth>();
    // The health endpoints first and last: live (and saying why not ready) while the data set loads and the silo
    // joins, and until it has left the cluster; a Kubernetes startup probe on /healthz covers the start.
    var healthServer = parse.GetValue(httpPort) > 0 ? new WebServer(host.Services, builder.Services, health.Readiness, healthBind!, parse.GetValue(httpPort)) : null;
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
        await health.DatasetLoaded().WaitAsync(cancel);
        if (redisConnection is not null)
        {
            // A Redis that is not up yet (its volume not bound, its pod not scheduled) is waited for here: Orleans' providers fail at once.
            health.WaitingForRedis(redisConnection.Endpoint);
            try
            {
                await redisConnection.WaitUntilAnswers(TimeSpan.FromSeconds(parse.GetValue(redisWait)), (why, next) =>
                    log.LogWarning("waiting for Redis {Redis}: {Why}; next try in {Seconds:F0} s", redisConnection.Description, why, next.TotalSeconds), cancel);
            }
            catch (RedisUnreachableException e)
            {
                Console.Error.WriteLine($"error: cannot connect to Redis {redisConnection.Description}: {e.Message}");
                return 1;
            }
        }
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
            // (gone again since it answered, or refusing what the wait accepted; StackExchange.Redis' messages never hold the
            // password). Orleans' Redis providers wrap StackExchange.Redis' exception in their own (RedisRemindersException,
            // RedisClusteringException), at times as text only.
            var redisError = Causes(e).FirstOrDefault(c => c is StackExchange.Redis.RedisConnectionException || c.GetType().Name.StartsWith("Redis", StringComparison.Ordinal));
            string why = redisError is not null
                ? $"cannot connect to Redis {redisConnection?.Description}: {redisConnection?.Tls?.Rejection ?? RedisConnection.Reason(redisError)}"
                : $"the silo did not start: {Causes(e).Last().Message}";
            Console.Error.WriteLine($"error: {why.ReplaceLineEndings(" ")}");
            return 1;
        }
        string membershipText = redisConnection is not null ? $"redis {redisConnection.Endpoint}" : $"primary {primaryEndpoint?.ToString() ?? "self"}";
        log.LogInformation("{Silo} up: role {Role}, cluster {Cluster}, host {Host}{Listen}, silo port {SiloPort}, gateway port {GatewayPort}, {Membership}, data {DataDir}, pid {Pid}",
            siloName, siloRole.ToString().ToLowerInvariant(), parse.GetValue(clusterId), advertised, inPod ? " (POD_IP; listening on all addresses)" : "",
            silo, gateway, membershipText, parse.GetValue(dataDir), Environment.ProcessId);
        if (tls is not null) log.LogInformation("{Silo} {Tls}", siloName, tls.Description);
        if (redisConnection?.Tls is { } redisTlsInUse) log.LogInformation("{Silo} Redis: {Tls}", siloName, redisTlsInUse.Description);
        // Cancelled by SIGTERM or Ctrl+C: the host stops, with --shutdown-timeout for its services (the silo leaving the cluster).
        await host.WaitForShutdownAsync(cancel);
        log.LogInformation("{Silo} stopped", siloName);
        return 0;
    }
    catch (Exception) when (cancel.IsCancellationRequested && !health.HasStarted)
    {
        // Asked to stop before it had joined (loading data, waiting for Redis, joining): nothing to hand over.
        log.LogInformation("{Silo} stopped before it joined the cluster", siloName);
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
// System.CommandLine cancels the action on SIGTERM and Ctrl+C, and ends the process this long afterwards whether or not the
// action has finished (2 s by default): the silo's stop must get its --shutdown-timeout first.
int shutdownSeconds = Math.Clamp(result.GetValue(shutdownTimeout), 1, MaxShutdownSeconds);
return await result.InvokeAsync(new InvocationConfiguration { ProcessTerminationTimeout = TimeSpan.FromSeconds(shutdownSeconds) + ShutdownGrace });

static System.Net.IPAddress PodAddress()
{
    // The address other silos and clients reach this pod at; the lowest address of the pod's interfaces may be another.
    string? text = Environment.GetEnvironmentVariable("POD_IP");
    if (string.IsNullOrWhiteSpace(text)) throw new ArgumentException("--kubernetes: POD_IP is not set (give the pod's IP from the downward API: fieldRef status.podIP)");
    return System.Net.IPAddress.TryParse(text.Trim(), out var address) ? address : throw new ArgumentException($"--kubernetes: POD_IP '{text}' is not an IP address");
}

static IEnumerable<Exception> Causes(Exception e)
{
    // An AggregateException's InnerException is its first: enough to find the cause of a failed start.
    for (Exception? c = e; c is not null; c = c.InnerException) yield return c;
}

static Option<T> Opt<T>(string flag, string env, T fallback, string description) => new(flag)
{
    Description = $"{description} [env {env}]",
    DefaultValueFactory = _ => EnvironmentValue.Get(env, flag, fallback),
};

internal sealed partial class Program
{
    private const int MaxShutdownSeconds = 3600;

    /// <summary>
    /// After --shutdown-timeout, the time the stopped silo has to finish (the health server, the last log lines)
    /// before the process ends regardless.
    /// </summary>
    private static readonly TimeSpan ShutdownGrace = TimeSpan.FromSeconds(5);
}
