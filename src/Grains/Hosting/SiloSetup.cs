using Backprop.Grains.Placement;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains.Hosting;

public sealed record WorkerSettings(int ThreadsPerWorker);

public static class SiloSetup
{
    public const string StorageName = "runs";

    /// <summary>
    /// What every silo of a Backprop cluster needs, whatever its clustering: grains' storage, placement,
    /// datasets, and how many threads each worker may use for one chunk (1 by default, so that several
    /// workers sharing a machine do not oversubscribe its cores; results do not depend on it).
    /// </summary>
    public static ISiloBuilder AddBackpropGrains(this ISiloBuilder silo, string dataDir, bool allowFetch = true, int threadsPerWorker = 1)
    {
        if (threadsPerWorker < 1 || threadsPerWorker > 256) throw new ArgumentException($"threads per worker: {threadsPerWorker} is outside 1..256");
        silo.Services.AddSingleton(new WorkerSettings(threadsPerWorker));
        silo.AddMemoryGrainStorage(StorageName);
        silo.AddPlacementDirector<SpreadPlacementStrategy, SpreadPlacementDirector>();
        silo.Services.AddSingleton(sp => new DatasetCache(dataDir, allowFetch, sp.GetRequiredService<ILogger<DatasetCache>>()));
        return silo;
    }
}
