using Backprop.Grains.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Orleans.Configuration;

namespace Backprop.Client;

/// <summary>
/// The CLI's way into a cluster: either an embedded single silo in this process (the default, for one
/// laptop) or a client of a running cluster through a gateway.
/// </summary>
public sealed class ClusterConnection : IAsyncDisposable
{
    private readonly IHost _host;

    private ClusterConnection(IHost host, IClusterClient client, string description, bool isEmbedded)
    {
        _host = host;
        Client = client;
        Description = description;
        IsEmbedded = isEmbedded;
    }

    private static readonly TimeSpan ConnectTimeout = TimeSpan.FromSeconds(15);

    public IClusterClient Client { get; }
    public IServiceProvider Services => _host.Services;
    public string Description { get; }
    public bool IsEmbedded { get; }

    public static async Task<ClusterConnection> StartEmbedded(string dataDir, int threadsPerWorker, CancellationToken cancel)
    {
        var builder = Host.CreateApplicationBuilder();
        Quiet(builder);
        int siloPort = LocalClustering.FreePort(), gatewayPort = LocalClustering.FreePort();
        builder.UseOrleans(silo => silo
            .UseLocalCluster("backprop-embedded-" + Environment.ProcessId, siloPort, gatewayPort, null, MembershipSettings.Fast)
            .AddFileGrainStorage(SiloSetup.StorageName, StateDirectory(dataDir))
            .AddBackpropGrains(dataDir, threadsPerWorker: threadsPerWorker, keepRunsGoing: false));
        var host = builder.Build();
        await host.StartAsync(cancel);
        return new ClusterConnection(host, host.Services.GetRequiredService<IClusterClient>(), "embedded cluster (1 silo in this process)", isEmbedded: true);
    }

    /// <summary>Where the embedded silo stores runs, so that an interrupted run can be resumed: beside the data sets.</summary>
    public static string StateDirectory(string dataDir) => Path.Combine(dataDir, "runs");

    public static async Task<ClusterConnection> Connect(ClusterAddress address, CancellationToken cancel)
    {
        var builder = Host.CreateApplicationBuilder();
        Quiet(builder);
        // Bounded: a client can otherwise keep retrying a gateway that never answers.
        using var limit = CancellationTokenSource.CreateLinkedTokenSource(cancel);
        string? tlsRejection = null;
        builder.UseOrleansClient(client =>
        {
            // A gateway certificate this client refuses will not change on a retry: give up at once.
            if (address.Tls is { } tls) client.UseBackpropTls(tls, reason =>
            {
                tlsRejection = reason;
                try { limit.Cancel(); } catch (ObjectDisposedException) { /* a reconnect after the start: nothing to stop */ }
            });
            if (address.Redis is { } redis)
            {
                client.UseRedisClustering(o => o.ConfigurationOptions = RedisCluster.Options(LocalClustering.ParseEndpoint(redis, "--redis"), address.RedisPassword));
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
        limit.CancelAfter(ConnectTimeout);
        try
        {
            await host.StartAsync(limit.Token);
        }
        catch (Exception e) when (!cancel.IsCancellationRequested)
        {
            host.Dispose();
            string reason = tlsRejection is not null ? "this client refused the gateway's certificate" : e is OperationCanceledException ? $"no answer within {ConnectTimeout.TotalSeconds:F0} s" : Cli.OneLine(e.Message);
            string where = address.Redis is { } r ? $"through Redis {r}" : $"at gateway {string.Join(", ", address.Gateways.Select(g => g.ToString()))}";
            // Redis refusing this client (not there, or AUTH) has nothing to do with TLS to the gateways.
            bool redisRefused = address.Redis is not null && Causes(e).Any(c => c is StackExchange.Redis.RedisConnectionException);
            string hint = !redisRefused ? TlsHint(address.Tls, tlsRejection)
                : address.RedisPassword is null ? $" (if Redis requires a password: --redis-password-file or {RedisPassword.Env})" : $" ({address.RedisPassword})";
            throw new ClusterUnreachableException($"cannot reach a cluster '{address.ClusterId}' {where}: {reason}{hint}");
        }
        return new ClusterConnection(host, host.Services.GetRequiredService<IClusterClient>(), address.Description, isEmbedded: false);
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
