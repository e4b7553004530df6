namespace Backprop.Client;

/// <summary>
/// One CLI process at a time drives a run of the embedded store: `train` and `resume` without a cluster hold an
/// exclusive lock on <c>{data-dir}/runs/locks/{run}.lock</c> until they exit. Without it a second process would start
/// a second coordinator over the same files; the shards fence one of them, but both would compute. The lock is the
/// operating system's (an exclusive open, flock on Linux): it goes with its process, so a killed CLI leaves nothing to clean up.
/// </summary>
public sealed class RunLock : IDisposable
{
    private readonly FileStream _file;

    private RunLock(FileStream file) => _file = file;

    /// <summary>Takes the lock of <paramref name="runId"/> in the embedded store at <paramref name="stateDirectory"/>, or throws when another process holds it.</summary>
    public static RunLock Take(string stateDirectory, string runId)
    {
        Backprop.Core.RunIds.Validate(runId);
        string folder = Path.Combine(stateDirectory, "locks");
        string path = Path.Combine(folder, runId + ".lock");
        try
        {
            Directory.CreateDirectory(folder);
            // Deleted when let go (not when the process is killed: the file is then empty and unlocked, and the next taker reuses it).
            return new RunLock(new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None, bufferSize: 1, FileOptions.DeleteOnClose));
        }
        catch (UnauthorizedAccessException e)
        {
            throw new IOException($"run '{runId}': cannot create its lock {path}: {e.Message}");
        }
        catch (IOException e) when (e is not FileNotFoundException and not DirectoryNotFoundException and not PathTooLongException && File.Exists(path))
        {
            throw new InvalidOperationException($"run '{runId}' is being run by another backprop process on this machine (it holds {path}); follow or stop that one, or resume once it has ended");
        }
    }

    public void Dispose() => _file.Dispose();
}
