using Backprop.Grains.Placement;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains.Hosting;

public sealed record WorkerSettings(int ThreadsPerWorker);

public static class SiloSetup
{
    public const string StorageName = "runs";

    /// <summary>
    /// What every silo of a Backprop cluster needs, whatever its clustering: placement, datasets, and how many
    /// threads each worker may use for one chunk (1 by default, so that several workers sharing a machine do
    /// not oversubscribe its cores; results do not depend on it).
    /// Grain storage is not registered here: the caller registers one named <see cref="StorageName"/> that
    /// suits its clustering (memory for a single process or tests, Redis for a Redis cluster).
    /// </summary>
    public static ISiloBuilder AddBackpropGrains(this ISiloBuilder silo, string dataDir, bool allowFetch = true, int threadsPerWorker = 1)
    {
        if (threadsPerWorker < 1 || threadsPerWorker > 256) throw new ArgumentException($"threads per worker: {threadsPerWorker} is outside 1..256");
        silo.Services.AddSingleton(new WorkerSettings(threadsPerWorker));
        silo.AddPlacementDirector<SpreadPlacementStrategy, SpreadPlacementDirector>();
        silo.Services.AddSingleton(sp => new DatasetCache(dataDir, allowFetch, sp.GetRequiredService<ILogger<DatasetCache>>()));
        return silo;
    }
}
