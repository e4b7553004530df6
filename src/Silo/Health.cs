using System.Net;
using Backprop.Grains.Hosting;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace Backprop.Silo;

/// <summary>
/// Whether this silo should get traffic: it has joined the cluster (membership says Active) and its data set is
/// loaded and checked. The data set is loaded before the silo joins rather than by the first chunk, so that a
/// silo with missing or damaged data is not ready (and says why) before any run relies on it.
/// </summary>
public sealed class SiloHealth(IClusterMembershipService membership, ILocalSiloDetails local, DatasetCache datasets, ILogger<SiloHealth> logger)
{
    private Task? _data;
    private string? _dataset;

    public void LoadDataset(string dataset)
    {
        _dataset = dataset;
        _data = datasets.Sha256(dataset).ContinueWith(t =>
        {
            if (t.IsFaulted) logger.LogError("Data set {Dataset} could not be loaded: {Error}", dataset, t.Exception!.InnerException!.Message);
            return t;
        }, TaskScheduler.Default).Unwrap();
    }

    /// <summary>Completes when the load has ended, loaded or failed.</summary>
    public Task DatasetLoaded() => _data?.ContinueWith(_ => { }, TaskScheduler.Default) ?? Task.CompletedTask;

    public (bool Ready, string Reason) Readiness()
    {
        var status = membership.CurrentSnapshot.GetSiloStatus(local.SiloAddress);
        if (status != SiloStatus.Active) return (false, $"membership status {status.ToString().ToLowerInvariant()}");
        if (_data is { } data)
        {
            if (data.IsFaulted) return (false, $"data set {_dataset} failed to load: {data.Exception!.InnerException!.Message}");
            if (!data.IsCompletedSuccessfully) return (false, $"loading data set {_dataset}");
        }
        return (true, "ready");
    }
}

/// <summary>/healthz (the process runs) and /readyz (<see cref="SiloHealth"/>) over plain HTTP, for probes.</summary>
public sealed class HealthServer(SiloHealth health, IPAddress bind, int port) : IHostedService
{
    private WebApplication? _app;

    public async Task StartAsync(CancellationToken cancellationToken)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(bind, port));
        _app = builder.Build();
        _app.MapGet("/healthz", () => Results.Text("live\n"));
        _app.MapGet("/readyz", () =>
        {
            var (ready, reason) = health.Readiness();
            return Results.Text(reason + "\n", statusCode: ready ? StatusCodes.Status200OK : StatusCodes.Status503ServiceUnavailable);
        });
        await _app.StartAsync(cancellationToken);
    }

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        if (_app is not null) await _app.StopAsync(cancellationToken);
    }
}
