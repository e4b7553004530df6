using System.Security.Cryptography;
using Backprop.Core.Data;
using Microsoft.Extensions.Logging;

namespace Backprop.Grains.Hosting;

/// <summary>
/// The datasets of one silo, loaded once from its data directory and shared by every worker on it.
/// A silo that lacks a built-in dataset fetches it (and verifies it) the first time it is asked for it; a user's own
/// folder (an absolute path) is read where it is and never fetched.
/// Each loaded set is identified by the SHA-256 of its contents, so a run can tell whether two silos
/// train on the same samples. A user's folder may change while the silo runs: each version read is kept with the sizes and
/// write times of its data files, the newest <see cref="VersionsPerFolder"/> of them, so that a running run keeps its copy
/// while a new run gets the files as they are now. The folder is read again when those sizes or times changed and a caller
/// wants the folder as it is now, or a version (a run's hash) that is not held; a read that fails keeps what is held.
/// </summary>
public sealed class DatasetCache(string dataDir, bool allowFetch, ILogger<DatasetCache> logger)
{
    /// <summary>The versions of one folder held at once: the current one and the one before, for the runs that started on it.</summary>
    public const int VersionsPerFolder = 2;

    private sealed record Entry(TrainTest Data, string Sha256, string? Files);

    private readonly Dictionary<string, Lazy<Task<Entry>>> _builtIn = new();
    private readonly Lock _gate = new();
    /// <summary>A user's folder's versions, newest first; only folders that loaded: messages naming others must not grow it.</summary>
    private readonly Dictionary<string, Entry[]> _folders = new();
    /// <summary>The read of a folder in flight, one for all the callers that found its files changed.</summary>
    private readonly Dictionary<string, Task<Entry>> _reading = new();
    /// <summary>A folder's last failed read and the files it was read from: given again, without a read, while they are unchanged.</summary>
    private readonly Dictionary<string, (string Files, Exception Error)> _failed = new();

    public string DataDir { get; } = dataDir;

    /// <summary>The data set as it is now (what a new run trains on).</summary>
    public async Task<TrainTest> Get(string dataset) => (await Current(dataset)).Data;

    /// <summary>SHA-256 (hex) over the training and test images and labels as loaded now (the same for raw and gzip files).</summary>
    public async Task<string> Sha256(string dataset) => (await Current(dataset)).Sha256;

    /// <summary>The data set as it is now and its hash, from one load: what a run records when it starts.</summary>
    public async Task<(TrainTest Data, string Sha256)> Current(string dataset)
    {
        DatasetCatalog.Validate(dataset);   // only known names and absolute folder paths reach the file system
        var entry = DatasetCatalog.IsBuiltIn(dataset) ? await BuiltIn(dataset) : await Now(dataset);
        return (entry.Data, entry.Sha256);
    }

    /// <summary>
    /// A run's data set: the copy whose hash is <paramref name="sha256"/>. Throws <see cref="DataMismatchException"/> naming
    /// the folder and both hashes when this silo holds no such copy and its files are another version.
    /// </summary>
    public async Task<TrainTest> Get(string dataset, string sha256)
    {
        DatasetCatalog.Validate(dataset);
        Entry entry;
        if (DatasetCatalog.IsBuiltIn(dataset)) entry = await BuiltIn(dataset);
        else
        {
            lock (_gate)
                if (_folders.GetValueOrDefault(dataset)?.FirstOrDefault(v => v.Sha256 == sha256) is { } held) return held.Data;
            // Read again only when the files changed: a message naming a wrong hash must not make the silo reread a folder.
            entry = await Now(dataset);
        }
        if (entry.Sha256 != sha256)
            throw new DataMismatchException(DatasetCatalog.IsBuiltIn(dataset)
                ? $"data set '{dataset}' in {DatasetCatalog.DirectoryOf(DataDir, dataset)}: sha256 {entry.Sha256} differs from the run's {sha256}; check the data directory"
                : $"{dataset}: its files hash to sha256 {entry.Sha256}, which differs from the run's {sha256} (changed since the run started?)");
        return entry.Data;
    }

    /// <summary>A built-in set, loaded (or fetched) once; one that failed stays failed: no fetch on every call.</summary>
    private Task<Entry> BuiltIn(string name)
    {
        Lazy<Task<Entry>> held;
        lock (_gate)
            if (!_builtIn.TryGetValue(name, out held!))
                _builtIn.Add(name, held = new Lazy<Task<Entry>>(() => Task.Run(() => LoadBuiltIn(name))));
        return held.Value;
    }

    /// <summary>A user's folder as it is now: the newest version held while its files are unchanged, else read again.</summary>
    private Task<Entry> Now(string folder)
    {
        Entry? newest;
        lock (_gate) newest = _folders.GetValueOrDefault(folder)?[0];
        string files = FilesOf(folder);
        if (newest is not null && newest.Files == files) return Task.FromResult(newest);
        lock (_gate)
        {
            if (_reading.TryGetValue(folder, out var inFlight)) return inFlight;
            // A folder whose files are as they were when its read failed (a broken file, a copy not finished) is not read again for every message.
            if (_failed.TryGetValue(folder, out var failed) && failed.Files == files) return Task.FromException<Entry>(failed.Error);
            // Listed in the table before it starts, so that its end always finds itself there to remove.
            var read = new Task<Entry>(() => ReadAndKeep(folder));
            _reading.Add(folder, read);
            read.Start(TaskScheduler.Default);
            return read;
        }
    }

    /// <summary>
    /// Reads a folder and keeps it as its newest version, dropping the oldest past <see cref="VersionsPerFolder"/>. A read
    /// that fails (a folder being copied, one not there yet) changes nothing held: its error goes to the callers that asked,
    /// and to those that ask until the files change. Content already held (a touched file, a gzip copy beside the raw one)
    /// keeps the copy held, so that the runs on it share one.
    /// </summary>
    private Entry ReadAndKeep(string folder)
    {
        // Looked at before reading: a change during the read shows as a change next time.
        string files = FilesOf(folder);
        try
        {
            var entry = LoadOwn(folder, files);
            lock (_gate)
            {
                var older = _folders.GetValueOrDefault(folder) ?? [];
                if (older.FirstOrDefault(v => v.Sha256 == entry.Sha256) is { } same) entry = entry with { Data = same.Data };
                _folders[folder] = [entry, .. older.Where(v => v.Sha256 != entry.Sha256).Take(VersionsPerFolder - 1)];
                _failed.Remove(folder);
            }
            return entry;
        }
        catch (Exception e)
        {
            lock (_gate) _failed[folder] = (files, e);
            throw;
        }
        finally
        {
            lock (_gate) _reading.Remove(folder);
        }
    }

    /// <summary>
    /// The sizes and write times of the files a folder's data set is read from. Only those names are looked at, so that a
    /// message naming a huge directory does not make the silo list it. A rewrite that keeps both size and write time
    /// (cp -p or tar x of a same-size file) is not seen: the time is all a cheap, portable check has.
    /// </summary>
    private static string FilesOf(string folder) => string.Join('/', DataFileNames.Select(name => new FileInfo(Path.Combine(folder, name)))
        .Where(f => f.Exists).Select(f => $"{f.Name}:{f.Length}:{f.LastWriteTimeUtc.Ticks}"));

    private static readonly string[] DataFileNames =
        [DatasetCatalog.TrainCsv, DatasetCatalog.TestCsv, .. DatasetCatalog.FileNames.SelectMany(f => new[] { f, f + ".gz" })];

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

    private Entry LoadOwn(string folder, string files)
    {
        var own = DatasetCatalog.LoadOwn(folder);
        string sha = Sha256Of(own);
        logger.LogInformation("Loaded {Dataset}: {Train} training and {Test} test samples of {Features} values, {Classes} classes, sha256 {Sha}",
            folder, own.Train.Count, own.Test.Count, own.Train.Features, own.Train.Classes, sha[..12]);
        return new(own, sha, files);
    }

    private Entry LoadBuiltIn(string name)
    {
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
