using System.Net;
using Backprop.Grains.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Orleans.Configuration;
using Orleans.Dashboard;

namespace Backprop.Client;

/// <summary>
/// The CLI's way into a cluster: either an embedded single silo in this process (the default, for one
/// laptop) or a client of a running cluster through a gateway.
/// </summary>
public sealed class ClusterConnection : IAsyncDisposable
{
    private readonly IHost _host;
    private readonly WebServer? _web;
    private readonly string? _dataDir;
    private readonly ClusterAddress? _address;

    private ClusterConnection(IHost host, IClusterClient client, string description, string? dataDir, ClusterAddress? address, WebServer? web = null)
    {
        _host = host;
        _web = web;
        Client = client;
        Description = description;
        _dataDir = dataDir;
        _address = address;
    }

    /// <summary>How long one try to reach a cluster may take: a client can otherwise keep retrying a gateway that never answers.</summary>
    public static readonly TimeSpan AttemptLimit = TimeSpan.FromSeconds(15);

    private static readonly TimeSpan MaxRetryDelay = TimeSpan.FromSeconds(15);

    public IClusterClient Client { get; }
    public IServiceProvider Services => _host.Services;
    public string Description { get; }
    public bool IsEmbedded => _dataDir is not null;

    /// <summary>
    /// The command that goes on with a run once this one stops following it: `resume` for the embedded silo's
    /// (stopped with this process), `watch` for a cluster's (which goes on).
    /// </summary>
    public string HowToContinue(string runId) => _address is null ? $"resume {runId} --data-dir {_dataDir}" : $"watch {runId} {_address.Flags}";

    /// <summary>
    /// A silo in this process; with <paramref name="httpPort"/>, its web server (the page, /metrics, the dashboard) on
    /// 127.0.0.1 at that port, its address printed on stderr.
    /// </summary>
    public static async Task<ClusterConnection> StartEmbedded(string dataDir, int threadsPerWorker, CancellationToken cancel, int? httpPort = null)
    {
        var builder = Host.CreateApplicationBuilder();
        Quiet(builder);
        int siloPort = LocalClustering.FreePort(), gatewayPort = LocalClustering.FreePort();
        builder.UseOrleans(silo =>
        {
            silo.UseLocalCluster("backprop-embedded-" + Environment.ProcessId, siloPort, gatewayPort, null, MembershipSettings.Fast)
                .AddFileGrainStorage(SiloSetup.StorageName, StateDirectory(dataDir))
                // One silo: its workers reach its shards by reference, so it opens no data lane.
                .AddBackpropGrains(dataDir, threadsPerWorker: threadsPerWorker, keepRunsGoing: false, retention: Backprop.Grains.Retention.Embedded, lanePort: -1);
            if (httpPort is not null) silo.AddDashboard();
        });
        var host = builder.Build();
        await host.StartAsync(cancel);
        WebServer? web = null;
        if (httpPort is { } port)
        {
            web = new WebServer(host.Services, builder.Services, () => (true, "ready"), IPAddress.Loopback, port);
            try
            {
                await web.StartAsync(cancel);
            }
            catch (IOException e)
            {
                await host.StopAsync(TimeSpan.FromSeconds(10));
                host.Dispose();
                throw new ArgumentException($"--http-port: cannot listen on 127.0.0.1:{port}: {e.Message.ReplaceLineEndings(" ")}");
            }
            Console.Error.WriteLine($"page: http://127.0.0.1:{port}/ (metrics: /metrics, Orleans Dashboard: /dashboard/)");
        }
        return new ClusterConnection(host, host.Services.GetRequiredService<IClusterClient>(), "embedded cluster (1 silo in this process)", dataDir, address: null, web);
    }

    /// <summary>Where the embedded silo stores runs, so that an interrupted run can be resumed: beside the data sets.</summary>
    public static string StateDirectory(string dataDir) => Path.Combine(dataDir, "runs");

    /// <summary>
    /// Connects to the cluster at <paramref name="address"/>: one try, or with <see cref="ClusterAddress.ConnectTimeout"/>
    /// tries of <see cref="AttemptLimit"/> each with back-off (1 s, doubling, at most 15 s) until it answers or that time is
    /// up (no try starts later), one line on stderr per failed try saying what it waits for (a Job started with its cluster
    /// waits for Redis and the first gateway). A refusal that waiting will not change (a certificate, Redis' password)
    /// ends the tries at once.
    /// </summary>
    public static async Task<ClusterConnection> Connect(ClusterAddress address, CancellationToken cancel)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var delay = TimeSpan.FromSeconds(1);
        while (true)
        {
            var (connection, failure) = await TryConnect(address, cancel);
            if (connection is not null) return connection;
            if (address.ConnectTimeout is not { } timeout) throw new ClusterUnreachableException(failure!.Message);
            if (!failure!.Retry || clock.Elapsed + delay >= timeout)
                throw new ClusterUnreachableException($"{failure.Message} (tried for {clock.Elapsed.TotalSeconds:F0} s)");
            Console.Error.WriteLine($"waiting for {address.Description}: {failure.Reason}; next try in {delay.TotalSeconds:F0} s");
            await Task.Delay(delay, cancel);
            delay = delay * 2 < MaxRetryDelay ? delay * 2 : MaxRetryDelay;
        }
    }

    /// <summary>Why a try failed: <see cref="Reason"/> alone, <see cref="Message"/> with where and hints; whether to try again.</summary>
    private sealed record Failure(string Reason, string Message, bool Retry);

    private static async Task<(ClusterConnection?, Failure?)> TryConnect(ClusterAddress address, CancellationToken cancel)
    {
        var builder = Host.CreateApplicationBuilder();
        Quiet(builder);
        using var attempt = CancellationTokenSource.CreateLinkedTokenSource(cancel);
        string? tlsRejection = null;
        builder.UseOrleansClient(client =>
        {
            client.Services.AddBackpropExceptions();
            // A gateway certificate this client refuses will not change on a retry: give up at once.
            if (address.Tls is { } tls) client.UseBackpropTls(tls, reason =>
            {
                tlsRejection = reason;
                try { attempt.Cancel(); } catch (ObjectDisposedException) { /* a reconnect after the start: nothing to stop */ }
            });
            if (address.Redis is { } redis)
            {
                client.UseRedisClustering(o => o.ConfigurationOptions = redis.Options());
                client.Configure<ClusterOptions>(o => { o.ClusterId = address.ClusterId; o.ServiceId = RedisCluster.ServiceIdOf(address.ClusterId); });
            }
            else
            {
                client.UseStaticClustering(address.Gateways);
                client.Configure<ClusterOptions>(o => { o.ClusterId = address.ClusterId; o.ServiceId = LocalClustering.ServiceId; });
            }
            client.Configure<ClientMessagingOptions>(o => o.ResponseTimeout = TimeSpan.FromSeconds(20));
        });
        var host = builder.Build();
        attempt.CancelAfter(AttemptLimit);
        try
        {
            await host.StartAsync(attempt.Token);
        }
        catch (Exception e) when (!cancel.IsCancellationRequested)
        {
            host.Dispose();
            string where = address.Redis is { } r ? $"through Redis {r.Endpoint}" : $"at gateway {string.Join(", ", address.Gateways.Select(g => g.ToString()))}";
            // Redis refusing this client (not there, AUTH, its certificate) has nothing to do with TLS to the gateways.
            var redisError = address.Redis is null ? null : Causes(e).OfType<StackExchange.Redis.RedisConnectionException>().FirstOrDefault();
            string reason = tlsRejection is not null ? "this client refused the gateway's certificate"
                : redisError is not null ? await address.Redis!.Why(redisError)
                : e is OperationCanceledException ? $"no gateway answered within {AttemptLimit.TotalSeconds:F0} s" : Cli.OneLine(e.Message);
            string hint = redisError is null ? TlsHint(address.Tls, tlsRejection)
                : address.Redis!.Tls?.Rejection is not null ? ""
                : address.Redis.Password is null ? $" (if Redis requires a password: --redis-password-file or {RedisPassword.Env})" : $" ({address.Redis.Password})";
            bool final = tlsRejection is not null || redisError is not null && address.Redis!.Refused(redisError);
            return (null, new Failure(reason, $"cannot reach a cluster '{address.ClusterId}' {where}: {reason}{hint}", Retry: !final));
        }
        return (new ClusterConnection(host, host.Services.GetRequiredService<IClusterClient>(), address.Description, dataDir: null, address), null);
    }

    private static IEnumerable<Exception> Causes(Exception e)
    {
        for (Exception? c = e; c is not null; c = c.InnerException) yield return c;
    }

    /// <summary>
    /// What TLS may have to do with a failed connection: the gateway certificate this client refused, else what
    /// a refusal by the cluster looks like from here (the connection closed during or after the handshake).
    /// </summary>
    private static string TlsHint(TlsFiles? tls, string? rejection) => tls is null
        ? " (TLS: not used; if the cluster requires it, give --tls-cert, --tls-key and --tls-ca)"
        : $" (TLS: {rejection ?? (tls.Certificate is null
            ? "if a gateway is up there, it refused this client: a cluster with TLS requires a client certificate (--tls-cert, --tls-key) signed by its CA"
            : $"if a gateway is up there, it refused this client: it may not use TLS, or not accept '{tls.Certificate.Subject}' (signed by another CA?)")})";

    /// <summary>Show the logs of Orleans and of the embedded silo on stderr (`--verbose`).</summary>
    public static bool Verbose { get; set; }

    /// <summary>
    /// The CLI reports failures itself, in one line: unless <see cref="Verbose"/>, no log line of Orleans or of
    /// the embedded silo reaches the console (a failed start or call becomes the CLI's own message).
    /// </summary>
    private static void Quiet(HostApplicationBuilder builder)
    {
        // Ctrl+C and SIGTERM belong to the command (it cancels or detaches from the run, then stops the host);
        // the host's console lifetime would otherwise stop the embedded silo under the running command.
        builder.Services.AddSingleton<IHostLifetime, CommandLifetime>();
        builder.Logging.ClearProviders();
        if (!Verbose) return;
        builder.Logging.AddSimpleConsole(o => o.SingleLine = true);
        builder.Logging.AddConsole(o => o.LogToStandardErrorThreshold = LogLevel.Trace);
        builder.Logging.SetMinimumLevel(LogLevel.Information);
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            if (_web is not null) await _web.StopAsync(CancellationToken.None);
            await _host.StopAsync(TimeSpan.FromSeconds(10));
        }
        finally
        {
            _host.Dispose();
        }
    }
}

/// <summary>A host lifetime that leaves process signals to the CLI command.</summary>
internal sealed class CommandLifetime : IHostLifetime
{
    public Task WaitForStartAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
}

public sealed class ClusterUnreachableException(string message) : Exception(message);
