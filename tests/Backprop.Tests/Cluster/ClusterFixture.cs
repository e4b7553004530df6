using Backprop.Core.Data;
using Backprop.Grains.Hosting;
using Orleans.Configuration;
using Orleans.TestingHost;

namespace Backprop.Tests.Cluster;

/// <summary>
/// A 3-silo in-process cluster whose silos read a generated MNIST-shaped dataset (named "mnist") from a
/// temporary data directory. Generated data keeps the tests independent of any download.
/// </summary>
public sealed class ClusterFixture : IAsyncLifetime
{
    public const int Silos = 3;
    public readonly string DataDir = Directory.CreateTempSubdirectory("cluster-data-").FullName;
    public TrainTest Data { get; } = SyntheticDigits.Create(trainCount: 1200, testCount: 400, seed: 5);
    public InProcessTestCluster Cluster { get; private set; } = null!;

    public async Task InitializeAsync()
    {
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), Data, gzip: true);
        var builder = new InProcessTestClusterBuilder(Silos);
        var dataDir = DataDir;
        builder.ConfigureSilo((_, silo) =>
        {
            silo.AddBackpropGrains(dataDir, allowFetch: false);
            silo.AddMemoryGrainStorage(SiloSetup.StorageName);
            silo.Configure<SiloMessagingOptions>(o => o.ResponseTimeout = TimeSpan.FromSeconds(30));
        });
        Cluster = builder.Build();
        await Cluster.DeployAsync();
    }

    public async Task DisposeAsync()
    {
        await Cluster.StopAllSilosAsync();
        await Cluster.DisposeAsync();
        Directory.Delete(DataDir, recursive: true);
    }
}

[CollectionDefinition("cluster", DisableParallelization = true)]
public sealed class ClusterCollection : ICollectionFixture<ClusterFixture>;
