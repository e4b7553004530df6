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
/// train on the same samples. A user's folder may change while the silo runs: it is kept with the names, sizes and
/// times of its files, and read again when they differ and a caller wants the folder as it is now, or a version
/// (a run's hash) other than the one held.
/// </summary>
public sealed class DatasetCache(string dataDir, bool allowFetch, ILogger<DatasetCache> logger)
{
    private sealed record Entry(TrainTest Data, string Sha256, string? Files);

    private readonly ConcurrentDictionary<string, Lazy<Task<Entry>>> _sets = new();

    public string DataDir { get; } = dataDir;

    /// <summary>The data set as it is now (what a new run trains on).</summary>
    public async Task<TrainTest> Get(string dataset) => (await Current(dataset)).Data;

    /// <summary>SHA-256 (hex) over the training and test images and labels as loaded now (the same for raw and gzip files).</summary>
    public async Task<string> Sha256(string dataset) => (await Current(dataset)).Sha256;

    /// <summary>The data set as it is now and its hash, from one load: what a run records when it starts.</summary>
    public async Task<(TrainTest Data, string Sha256)> Current(string dataset)
    {
        var (held, entry) = await Held(dataset);
        if (entry.Files is not null && entry.Files != FilesOf(dataset)) entry = await Reload(dataset, held);
        return (entry.Data, entry.Sha256);
    }

    /// <summary>
    /// A run's data set: the copy whose hash is <paramref name="sha256"/>. Throws <see cref="DataMismatchException"/> naming
    /// the folder and both hashes when this silo's files are another version.
    /// </summary>
    public async Task<TrainTest> Get(string dataset, string sha256)
    {
        var (held, entry) = await Held(dataset);
        // Read again only when the files changed: a message naming a wrong hash must not make the silo reread a folder.
        if (entry.Sha256 != sha256 && entry.Files is not null && entry.Files != FilesOf(dataset)) entry = await Reload(dataset, held);
        if (entry.Sha256 != sha256)
            throw new DataMismatchException(DatasetCatalog.IsBuiltIn(dataset)
                ? $"data set '{dataset}' in {DatasetCatalog.DirectoryOf(DataDir, dataset)}: sha256 {entry.Sha256} differs from the run's {sha256}; check the data directory"
                : $"{dataset}: its files hash to sha256 {entry.Sha256}, which differs from the run's {sha256} (changed since the run started?)");
        return entry.Data;
    }

    private async Task<(Lazy<Task<Entry>> Held, Entry Entry)> Held(string dataset)
    {
        DatasetCatalog.Validate(dataset);   // only known names and absolute folder paths reach the file system
        var held = _sets.GetOrAdd(dataset, name => new Lazy<Task<Entry>>(() => LoadOrForget(name)));
        return (held, await held.Value);
    }

    /// <summary>One load for all the callers that found the same outdated copy.</summary>
    private Task<Entry> Reload(string dataset, Lazy<Task<Entry>> outdated)
    {
        var next = new Lazy<Task<Entry>>(() => LoadOrForget(dataset));
        return (_sets.TryUpdate(dataset, next, outdated) ? next : _sets.GetOrAdd(dataset, next)).Value;
    }

    /// <summary>
    /// A folder of the user's that failed to load is not kept: it may be put in place later, and messages naming folders
    /// that do not exist must not grow this cache. (A built-in set that failed stays failed: no fetch on every call.)
    /// </summary>
    private async Task<Entry> LoadOrForget(string name)
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

    /// <summary>The names, sizes and write times of a user's folder's files (null for a built-in set, which never changes under a run).</summary>
    private static string? FilesOf(string dataset)
    {
        if (DatasetCatalog.IsBuiltIn(dataset)) return null;
        var dir = new DirectoryInfo(dataset);
        return dir.Exists
            ? string.Join('/', dir.EnumerateFiles().OrderBy(f => f.Name, StringComparer.Ordinal).Select(f => $"{f.Name}:{f.Length}:{f.LastWriteTimeUtc.Ticks}"))
            : "";
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

    private Entry Load(string name)
    {
        if (!DatasetCatalog.IsBuiltIn(name))
        {
            // Listed before reading: a change during the read shows as a change next time.
            string? files = FilesOf(name);
            var own = DatasetCatalog.LoadOwn(name);
            string ownSha = Sha256Of(own);
            logger.LogInformation("Loaded {Dataset}: {Train} training and {Test} test samples of {Features} values, {Classes} classes, sha256 {Sha}",
                name, own.Train.Count, own.Test.Count, own.Train.Features, own.Train.Classes, ownSha[..12]);
            return new(own, ownSha, files);
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
        return new(data, sha, null);
    }
}
