using System.Collections.Concurrent;
using System.Text;
using Microsoft.Extensions.DependencyInjection;
using Orleans.Runtime;
using Orleans.Storage;

namespace Backprop.Grains.Hosting;

/// <summary>
/// Grain storage in a directory: one file per grain state, written to a temporary file, flushed and
/// renamed over the old one, so a crash leaves either the old or the new state, never a torn one.
/// The file starts with a version number that serves as the ETag; a lock file held across the check and
/// the write keeps two processes (two CLI commands on one data directory) from both writing the same next
/// version. For the embedded silo (an interrupted run can be resumed) and for in-process test clusters
/// whose silos share one directory; a real cluster uses Redis.
/// </summary>
public sealed class FileGrainStorage : IGrainStorage
{
    /// <summary>A temporary file this old is left by a writer that died between writing and renaming it (a write takes milliseconds).</summary>
    public static readonly TimeSpan OrphanAge = TimeSpan.FromMinutes(1);

    private readonly string directory;
    private readonly IGrainStorageSerializer serializer;

    public FileGrainStorage(string directory, IGrainStorageSerializer serializer)
    {
        (this.directory, this.serializer) = (directory, serializer);
        RemoveOrphans(directory, OrphanAge);
    }

    /// <summary>Deletes the temporary files of writes that never reached their rename; returns how many.</summary>
    public static int RemoveOrphans(string directory, TimeSpan olderThan)
    {
        if (!Directory.Exists(directory)) return 0;
        int removed = 0;
        foreach (var file in Directory.EnumerateFiles(directory, "*.tmp", SearchOption.AllDirectories))
        {
            try
            {
                if (DateTime.UtcNow - File.GetLastWriteTimeUtc(file) < olderThan) continue;   // maybe a write in progress
                File.Delete(file);
                removed++;
            }
            catch (IOException)
            {
                // gone already, or in use: the next start looks again
            }
        }
        return removed;
    }

    // Shared by every silo of the process: in-process test clusters write the same files from several silos.
    private static readonly ConcurrentDictionary<string, SemaphoreSlim> Locks = new();

    public Task ReadStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState) =>
        Locked(PathOf(stateName, grainId), acrossProcesses: false, async path =>
        {
            if (!File.Exists(path))
            {
                grainState.State = Activator.CreateInstance<T>();
                grainState.ETag = null;
                grainState.RecordExists = false;
                return;
            }
            var bytes = await File.ReadAllBytesAsync(path);
            if (bytes.Length < sizeof(long)) throw new InvalidDataException($"{path}: grain state file is truncated ({bytes.Length} bytes)");
            grainState.State = serializer.Deserialize<T>(new BinaryData(bytes.AsMemory(sizeof(long))));
            grainState.ETag = BitConverter.ToInt64(bytes).ToString(System.Globalization.CultureInfo.InvariantCulture);
            grainState.RecordExists = true;
        });

    public Task WriteStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState) =>
        Locked(PathOf(stateName, grainId), acrossProcesses: true, async path =>
        {
            long version = CheckETag(path, grainState.ETag) + 1;
            var payload = serializer.Serialize(grainState.State);
            var temp = $"{path}.{Guid.NewGuid():N}.tmp";
            await using (var file = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16, FileOptions.Asynchronous))
            {
                await file.WriteAsync(BitConverter.GetBytes(version));
                await file.WriteAsync(payload.ToMemory());
                file.Flush(flushToDisk: true);
            }
            File.Move(temp, path, overwrite: true);
            // The rename is durable only once the directory is: without this a power cut can bring the old file back.
            SyncDirectory(Path.GetDirectoryName(path)!);
            grainState.ETag = version.ToString(System.Globalization.CultureInfo.InvariantCulture);
            grainState.RecordExists = true;
        });

    public Task ClearStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState) =>
        Locked(PathOf(stateName, grainId), acrossProcesses: true, path =>
        {
            CheckETag(path, grainState.ETag);
            File.Delete(path);
            grainState.ETag = null;
            grainState.RecordExists = false;
            grainState.State = Activator.CreateInstance<T>();
            return Task.CompletedTask;
        });

    /// <summary>
    /// Runs <paramref name="action"/> on <paramref name="path"/> alone among this process's silos, and, for
    /// changes, alone among processes too (the check of the ETag and the write must not interleave).
    /// </summary>
    private static async Task Locked(string path, bool acrossProcesses, Func<string, Task> action)
    {
        var gate = Locks.GetOrAdd(path, _ => new SemaphoreSlim(1, 1));
        await gate.WaitAsync();
        try
        {
            if (!acrossProcesses)
            {
                await action(path);
                return;
            }
            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            using var processLock = await LockAcrossProcesses(path);
            await action(path);
        }
        finally
        {
            gate.Release();
        }
    }

    /// <summary>An exclusive lock on "{path}.lock" (flock on Unix), waited for up to 10 s.</summary>
    private static async Task<FileStream> LockAcrossProcesses(string path)
    {
        for (int attempt = 0; ; attempt++)
        {
            try
            {
                return new FileStream(path + ".lock", FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
            }
            catch (IOException) when (attempt < 1000)
            {
                await Task.Delay(10);
            }
        }
    }

    private static void SyncDirectory(string path)
    {
        if (!OperatingSystem.IsLinux()) return;
        int fd = Native.open(path, Native.ReadOnlyDirectory);
        if (fd < 0) throw new IOException($"{path}: cannot open the directory to sync it (errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()})");
        try
        {
            if (Native.fsync(fd) != 0) throw new IOException($"{path}: fsync of the directory failed (errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()})");
        }
        finally
        {
            Native.close(fd);
        }
    }

    private static class Native
    {
        /// <summary>O_RDONLY | O_DIRECTORY (Linux).</summary>
        public const int ReadOnlyDirectory = 0x10000;

        [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
        public static extern int open([System.Runtime.InteropServices.MarshalAs(System.Runtime.InteropServices.UnmanagedType.LPUTF8Str)] string path, int flags);

        [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
        public static extern int fsync(int fd);

        [System.Runtime.InteropServices.DllImport("libc")]
        public static extern int close(int fd);
    }

    /// <summary>The version stored now (0 when there is no file); throws when the caller's ETag is not it.</summary>
    private static long CheckETag(string path, string? etag)
    {
        long stored = 0;
        if (File.Exists(path))
        {
            using var file = File.OpenRead(path);
            Span<byte> header = stackalloc byte[sizeof(long)];
            file.ReadExactly(header);
            stored = BitConverter.ToInt64(header);
        }
        string expected = stored == 0 ? "" : stored.ToString(System.Globalization.CultureInfo.InvariantCulture);
        if ((etag ?? "") != expected)
            throw new InconsistentStateException($"{path}: stored version {expected}, the grain holds {etag ?? "none"}", expected, etag ?? "");
        return stored;
    }

    private string PathOf(string stateName, GrainId grainId) =>
        Path.Combine(directory, Escape(stateName), Escape(grainId.ToString()) + ".state");

    // Grain keys are user input (run ids): escaped so that no key can name a path outside the directory.
    private static string Escape(string name)
    {
        var sb = new StringBuilder(name.Length);
        foreach (char c in name)
        {
            if (char.IsAsciiLetterOrDigit(c) || c is '-' or '_') sb.Append(c);
            else foreach (byte b in Encoding.UTF8.GetBytes(c.ToString())) sb.Append('%').Append(b.ToString("X2"));
        }
        return sb.ToString();
    }
}

public static class FileGrainStorageExtensions
{
    /// <summary>Registers <see cref="FileGrainStorage"/> under <paramref name="name"/>, storing grain state with Orleans' binary serializer.</summary>
    public static ISiloBuilder AddFileGrainStorage(this ISiloBuilder silo, string name, string directory)
    {
        silo.Services.AddKeyedSingleton<IGrainStorage>(name, (sp, _) =>
            new FileGrainStorage(directory, new OrleansGrainStorageSerializer(sp.GetRequiredService<Orleans.Serialization.Serializer>())));
        return silo;
    }
}
