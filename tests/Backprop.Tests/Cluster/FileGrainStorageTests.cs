using Backprop.Grains.Hosting;

namespace Backprop.Tests.Cluster;

public sealed class FileGrainStorageTests
{
    [Fact]
    public void Temporary_files_of_writes_that_died_are_removed_at_start_and_those_of_writes_in_progress_kept()
    {
        string dir = Directory.CreateTempSubdirectory("file-storage-").FullName;
        try
        {
            Directory.CreateDirectory(Path.Combine(dir, "run"));
            string orphan = Path.Combine(dir, "run", "x.state.0123.tmp"), fresh = Path.Combine(dir, "run", "y.state.4567.tmp");
            string state = Path.Combine(dir, "run", "x.state");
            foreach (var f in new[] { orphan, fresh, state }) File.WriteAllText(f, "x");
            File.SetLastWriteTimeUtc(orphan, DateTime.UtcNow - TimeSpan.FromHours(2));
            File.SetLastWriteTimeUtc(state, DateTime.UtcNow - TimeSpan.FromHours(2));

            _ = new FileGrainStorage(dir, null!);

            Assert.False(File.Exists(orphan));
            Assert.True(File.Exists(fresh));
            Assert.True(File.Exists(state));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
