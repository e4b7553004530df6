using Backprop.Grains.Placement;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains.Hosting;

/// <summary>
/// What a silo's grains are allowed to use: how many threads each worker may use for one chunk, and whether
/// runs stored as running are continued by this silo (a cluster: yes; the embedded silo of a CLI: only
/// when asked, with `resume`), and which grains it hosts.
/// </summary>
public sealed record WorkerSettings(int ThreadsPerWorker, bool KeepRunsGoing = true, SiloRole Role = SiloRole.All)
{
    /// <summary>Tests only (<see cref="SiloSetup.DelayWorkersForTests"/>): extra compute time per chunk, a deliberate straggler.</summary>
    internal TimeSpan ComputeDelayPerChunk { get; init; }
}

public static class SiloSetup
{
    public const string StorageName = "runs";

    /// <summary>
    /// What every silo of a Backprop cluster needs, whatever its clustering: its role (which grains it hosts),
    /// placement, datasets, the run watchdog, how long finished runs are kept (<see cref="Retention"/>), how many threads each worker may use for one chunk (1 by default, so that several workers
    /// sharing a machine do not oversubscribe its cores; results do not depend on it), and the port of its data lane
    /// (<see cref="DataLane"/>; 0: any free port, −1: none).
    /// Grain storage is not registered here: the caller registers one named <see cref="StorageName"/> that
    /// suits its clustering (files for the embedded silo and test clusters, Redis for a Redis cluster).
    /// </summary>
    public static ISiloBuilder AddBackpropGrains(this ISiloBuilder silo, string dataDir, bool allowFetch = true, int threadsPerWorker = 1,
        bool keepRunsGoing = true, SiloRole role = SiloRole.All, Retention? retention = null, int lanePort = 0)
    {
        if (lanePort is < -1 or > 65535) throw new ArgumentException($"data lane port: {lanePort} is outside -1..65535 (0: any free port, -1: off)");
        if (threadsPerWorker < 1 || threadsPerWorker > Backprop.Core.ResourceLimits.MaxThreadsPerWorker)
            throw new ArgumentException($"threads per worker: {threadsPerWorker} is outside 1..{Backprop.Core.ResourceLimits.MaxThreadsPerWorker}");
        retention ??= new Retention();
        retention.Validate();
        silo.Services.AddSingleton(new WorkerSettings(threadsPerWorker, keepRunsGoing, role));
        silo.Services.AddSingleton(retention);
        silo.Services.AddBackpropExceptions();
        silo.Services.AddLargeConnectionBlocks();
        silo.Services.Configure<LaneOptions>(o => o.Port = lanePort);
        silo.Services.AddSingleton<DataLane>();
        silo.Services.AddSingleton<ILifecycleParticipant<ISiloLifecycle>>(sp => sp.GetRequiredService<DataLane>());
        silo.Services.AddSingleton<WorkerSilos>();
        silo.ApplyRole(role);
        BackpropMetrics.SiloStarted(role);
        silo.AddPlacementDirector<SpreadPlacementStrategy, SpreadPlacementDirector>();
        silo.Services.AddSingleton(sp => new DatasetCache(dataDir, allowFetch, sp.GetRequiredService<ILogger<DatasetCache>>()));
        if (keepRunsGoing) silo.Services.AddHostedService<RunWatchdog>();
        return silo;
    }

    /// <summary>
    /// Tests only, after <see cref="AddBackpropGrains"/>: every worker on this silo waits <paramref name="perChunk"/> more per
    /// chunk it computes, counted as its compute time, so that a test can make one silo's workers stragglers. No option
    /// or variable reaches it.
    /// </summary>
    internal static ISiloBuilder DelayWorkersForTests(this ISiloBuilder silo, TimeSpan perChunk)
    {
        var settings = (WorkerSettings)silo.Services.Single(d => d.ServiceType == typeof(WorkerSettings)).ImplementationInstance!;
        silo.Services.Replace(ServiceDescriptor.Singleton(settings with { ComputeDelayPerChunk = perChunk }));
        return silo;
    }

    /// <summary>
    /// This project's exceptions cross the wire as themselves (type and message), on silos and clients alike: Orleans
    /// otherwise serializes only exceptions of its own and the framework's namespaces, and the caller of a call that
    /// failed with, say, a damaged data file would read "Could not find a codec" instead of the file's message.
    /// </summary>
    public static IServiceCollection AddBackpropExceptions(this IServiceCollection services) =>
        services.Configure<Orleans.Serialization.ExceptionSerializationOptions>(o =>
        {
            if (!o.SupportedNamespacePrefixes.Contains("Backprop")) o.SupportedNamespacePrefixes.Add("Backprop");
        });
}
