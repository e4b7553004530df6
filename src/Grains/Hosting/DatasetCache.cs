using System.Collections.Concurrent;
using System.Security.Cryptography;
using Backprop.Core.Data;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains.Hosting;

/// <summary>
/// The datasets of one silo, loaded once from its data directory and shared by every worker on it.
/// A silo that lacks a built-in dataset fetches it (and verifies it) the first time it is asked for it; a user's own
/// folder (an absolute path) is read where it is and never fetched.
/// Each loaded set is identified by the SHA-256 of its contents, so a run can tell whether two silos
/// train on the same samples.
/// </summary>
public sealed class DatasetCache(string dataDir, bool allowFetch, ILogger<DatasetCache> logger)
{
    private readonly ConcurrentDictionary<string, Lazy<Task<(TrainTest Data, string Sha256)>>> _sets = new();

    public string DataDir { get; } = dataDir;

    public async Task<TrainTest> Get(string dataset) => (await Entry(dataset)).Data;

    /// <summary>SHA-256 (hex) over the training and test images and labels as loaded (the same for raw and gzip files).</summary>
    public async Task<string> Sha256(string dataset) => (await Entry(dataset)).Sha256;

    private Task<(TrainTest Data, string Sha256)> Entry(string dataset)
    {
        DatasetCatalog.Validate(dataset);   // only known names and absolute folder paths reach the file system
        return _sets.GetOrAdd(dataset, name => new Lazy<Task<(TrainTest Data, string Sha256)>>(() => LoadOrForget(name))).Value;
    }

    /// <summary>
    /// A folder of the user's that failed to load is not kept: it may be put in place later, and messages naming folders
    /// that do not exist must not grow this cache. (A built-in set that failed stays failed: no fetch on every call.)
    /// </summary>
    private async Task<(TrainTest Data, string Sha256)> LoadOrForget(string name)
    {
        try
        {
            return await Task.Run(() => Load(name));
        }
        catch when (!DatasetCatalog.IsBuiltIn(name))
        {
            _sets.TryRemove(name, out _);
            throw;
        }
    }

    public static string Sha256Of(TrainTest data)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var set in new[] { data.Train, data.Test })
        {
            hash.AppendData(BitConverter.GetBytes(set.Rows));
            hash.AppendData(BitConverter.GetBytes(set.Cols));
            hash.AppendData(set.Pixels);
            hash.AppendData(set.Labels);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    private (TrainTest, string) Load(string name)
    {
        if (!DatasetCatalog.IsBuiltIn(name))
        {
            var own = DatasetCatalog.LoadOwn(name);
            string ownSha = Sha256Of(own);
            logger.LogInformation("Loaded {Dataset}: {Train} training and {Test} test samples of {Features} values, {Classes} classes, sha256 {Sha}",
                name, own.Train.Count, own.Test.Count, own.Train.Features, own.Train.Classes, ownSha[..12]);
            return (own, ownSha);
        }
        var dir = DatasetCatalog.DirectoryOf(DataDir, name);
        if (!DatasetCatalog.IsPresent(dir))
        {
            if (!allowFetch) throw new DataFileException(dir, $"dataset '{name}' is not in this silo's data directory");
            logger.LogInformation("Fetching dataset {Dataset} into {Dir}", name, DataDir);
            DataFetcher.Fetch(name, DataDir, line => logger.LogInformation("{Progress}", line));
        }
        var data = DatasetCatalog.Load(dir, name);
        string sha = Sha256Of(data);
        logger.LogInformation("Loaded {Dataset}: {Train} training and {Test} test images from {Dir}, sha256 {Sha}", name, data.Train.Count, data.Test.Count, dir, sha[..12]);
        return (data, sha);
    }
}
