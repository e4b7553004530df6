using Backprop.Grains.Placement;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains.Hosting;

public static class SiloSetup
{
    public const string StorageName = "runs";

    /// <summary>What every silo of a Backprop cluster needs, whatever its clustering: grains' storage, placement, datasets.</summary>
    public static ISiloBuilder AddBackpropGrains(this ISiloBuilder silo, string dataDir, bool allowFetch = true)
    {
        silo.AddMemoryGrainStorage(StorageName);
        silo.AddPlacementDirector<SpreadPlacementStrategy, SpreadPlacementDirector>();
        silo.Services.AddSingleton(sp => new DatasetCache(dataDir, allowFetch, sp.GetRequiredService<ILogger<DatasetCache>>()));
        return silo;
    }
}
