using System.Net;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OpenTelemetry.Metrics;
using Orleans.Dashboard;

namespace Backprop.Grains.Hosting;

/// <summary>
/// A silo's HTTP port, all read-only: /healthz and /readyz for probes, /metrics (Prometheus text of the
/// <see cref="BackpropMetrics"/> meter and the .NET runtime), the page at / with its JSON under /api (<see cref="RunPages"/>),
/// and the Orleans Dashboard at /dashboard. Not a hosted service of the silo's host: the silo's program starts it before
/// the silo joins and stops it after the silo has left, so that a startup probe sees the process live while it loads
/// data and joins; the page and the dashboard answer 503 until the silo runs.
/// </summary>
public sealed class WebServer(IServiceProvider silo, IServiceCollection siloServices, Func<(bool Ready, string Reason)> readiness, IPAddress bind, int port)
{
    private WebApplication? _app;

    public async Task StartAsync(CancellationToken cancellationToken)
    {
        var builder = WebApplication.CreateSlimBuilder();
        // Signals belong to the silo's command, which stops this server last.
        builder.Services.AddSingleton<IHostLifetime, SignalsToCommand>();
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(bind, port));
        builder.Services.AddOpenTelemetry().WithMetrics(m => m.AddMeter(BackpropMetrics.MeterName).AddRuntimeInstrumentation()
            // No cached answer: a scrape sees what happened up to it (scrapes come seconds apart, each is cheap).
            .AddPrometheusExporter(o => o.ScrapeResponseCacheDurationMilliseconds = 0));
        ShareDashboard(builder.Services);
        _app = builder.Build();
        _app.MapGet("/healthz", () => Results.Text("live\n"));
        _app.MapGet("/readyz", () =>
        {
            var (ready, reason) = readiness();
            return ready ? Results.Text(reason + "\n") : Results.Text($"not ready: {reason}\n", statusCode: StatusCodes.Status503ServiceUnavailable);
        });
        // The dashboard's GrainState page calls state-returning methods of any grain by id: not on a page that the
        // pods of a cluster can reach.
        _app.Use(async (context, next) =>
        {
            if (context.Request.Path.StartsWithSegments("/dashboard/GrainState", StringComparison.OrdinalIgnoreCase))
                await Results.Text("not served here\n", statusCode: 404).ExecuteAsync(context);
            else
                await next(context);
        });
        _app.MapPrometheusScrapingEndpoint("/metrics");
        RunPages.Map(_app, silo.GetRequiredService<IGrainFactory>(), () => readiness().Ready);
        if (HasDashboard) _app.MapOrleansDashboard("/dashboard");
        // Every endpoint here is read-only: anything but GET is 405, an unknown path 404, each with one line.
        _app.MapFallback((HttpContext context) => HttpMethods.IsGet(context.Request.Method) || HttpMethods.IsHead(context.Request.Method)
            ? Results.Text("not found\n", statusCode: 404)
            : Results.Text("method not allowed: the endpoints are read-only\n", statusCode: 405));
        await _app.StartAsync(cancellationToken);
    }

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        if (_app is not null) await _app.StopAsync(cancellationToken);
    }

    /// <summary>
    /// The dashboard's services live in the silo (its grain service, its profiler of grain calls); its endpoints resolve
    /// them from this web application: each of its types resolves to the silo's instance.
    /// </summary>
    private void ShareDashboard(IServiceCollection web)
    {
        foreach (var type in DashboardTypes()) web.AddSingleton(type, _ => silo.GetRequiredService(type));
        web.Configure<DashboardOptions>(o => o.HideTrace = true);
    }

    private bool HasDashboard => DashboardTypes().Any();

    private IEnumerable<Type> DashboardTypes() => siloServices
        .Where(d => d.Lifetime == ServiceLifetime.Singleton && !d.ServiceType.IsGenericTypeDefinition && d.ServiceType.Assembly == typeof(DashboardOptions).Assembly)
        .Select(d => d.ServiceType).Distinct();
}

/// <summary>
/// A host lifetime that leaves SIGTERM and Ctrl+C to the command, which stops its hosts itself and in order: the silo
/// (with --shutdown-timeout), then the web server.
/// </summary>
public sealed class SignalsToCommand : IHostLifetime
{
    public Task WaitForStartAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
}
