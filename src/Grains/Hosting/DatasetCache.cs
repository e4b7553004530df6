using System.Collections.Concurrent;
using Backprop.Core.Data;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains.Hosting;

/// <summary>
/// The datasets of one silo, loaded once from its data directory and shared by every worker on it.
/// A silo that lacks a dataset fetches it (and verifies it) the first time it is asked for it.
/// </summary>
public sealed class DatasetCache(string dataDir, bool allowFetch, ILogger<DatasetCache> logger)
{
    private readonly ConcurrentDictionary<string, Lazy<Task<TrainTest>>> _sets = new();

    public string DataDir { get; } = dataDir;

    public Task<TrainTest> Get(string dataset) =>
        _sets.GetOrAdd(dataset, name => new Lazy<Task<TrainTest>>(() => Task.Run(() => Load(name)))).Value;

    private TrainTest Load(string name)
    {
        var dir = DatasetCatalog.DirectoryOf(DataDir, name);
        if (!DatasetCatalog.IsPresent(dir))
        {
            if (!allowFetch) throw new DataFileException(dir, $"dataset '{name}' is not in this silo's data directory");
            logger.LogInformation("Fetching dataset {Dataset} into {Dir}", name, DataDir);
            DataFetcher.Fetch(name, DataDir, line => logger.LogInformation("{Progress}", line));
        }
        var data = DatasetCatalog.Load(dir, name);
        logger.LogInformation("Loaded {Dataset}: {Train} training and {Test} test images from {Dir}", name, data.Train.Count, data.Test.Count, dir);
        return data;
    }
}
