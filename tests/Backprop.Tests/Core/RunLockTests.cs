using Backprop.Client;

namespace Backprop.Tests.Core;

/// <summary>The lock a CLI process holds on a run of the embedded store while it drives it.</summary>
public sealed class RunLockTests : IDisposable
{
    private readonly string _store = Directory.CreateTempSubdirectory("runlock-").FullName;

    public void Dispose() => Directory.Delete(_store, recursive: true);

    [Fact]
    public void A_held_run_is_refused_to_a_second_holder_and_free_again_once_let_go()
    {
        var held = RunLock.Take(_store, "run-1");
        var refused = Assert.Throws<InvalidOperationException>(() => RunLock.Take(_store, "run-1"));
        Assert.Contains("run 'run-1' is being run by another backprop process", refused.Message);
        // The refused taker leaves the holder's file where it is: a third taker must be refused too.
        Assert.True(File.Exists(Path.Combine(_store, "locks", "run-1.lock")), "a refused taker removed the held lock's file");
        Assert.Throws<InvalidOperationException>(() => RunLock.Take(_store, "run-1"));
        using (RunLock.Take(_store, "run-2")) { }   // another run of the same store
        held.Dispose();
        Assert.False(File.Exists(Path.Combine(_store, "locks", "run-1.lock")), "a lock let go leaves its file behind");
        using var again = RunLock.Take(_store, "run-1");
    }

    [Fact]
    public void A_run_id_that_is_not_a_file_name_is_refused_before_anything_is_created()
    {
        Assert.Throws<ArgumentException>(() => RunLock.Take(_store, "../escape"));
        Assert.False(Directory.Exists(Path.Combine(_store, "locks")));
    }
}
