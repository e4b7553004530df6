using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// A temporary folder for one end-to-end test: cluster.sh's state (pids, logs, Redis' data) and the silos' data
/// directory. Whatever the test started with cluster.sh is stopped, and the folder deleted, when it ends.
/// </summary>
public abstract class ClusterWorkspace(string prefix) : IDisposable
{
    protected string Work { get; } = Directory.CreateTempSubdirectory(prefix).FullName;
    protected string State => Path.Combine(Work, "state");
    protected string DataDir => Path.Combine(Work, "data");

    public void Dispose()
    {
        Script(State, "stop");
        Directory.Delete(Work, recursive: true);
        GC.SuppressFinalize(this);
    }
}
