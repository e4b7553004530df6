using Backprop.Core.Data;
using Backprop.Grains.Hosting;
using Orleans.Configuration;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Messages;
using Orleans.Runtime.Placement;
using Orleans.TestingHost;

namespace Backprop.Tests.Cluster;

/// <summary>
/// A 3-silo in-process cluster whose silos read a generated MNIST-shaped dataset (named "mnist") from a
/// temporary data directory. Generated data keeps the tests independent of any download.
/// </summary>
public sealed class ClusterFixture : IAsyncLifetime, IAsyncDisposable
{
    public ClusterFixture() : this(1200, 400) { }

    /// <summary>A cluster for one test, with other data sizes (xunit needs the shared fixture's constructor to be the only public one).</summary>
    /// <param name="computeDelay">Per silo: extra compute time per chunk for its workers (a deliberate straggler); zero: none.</param>
    internal ClusterFixture(int trainCount, int testCount, Func<int, SiloRole>? roles = null, Retention? retention = null, Func<int, TimeSpan>? computeDelay = null)
    {
        Data = SyntheticDigits.Create(trainCount, testCount, seed: 5);
        _roles = roles ?? (_ => SiloRole.All);
        _retention = retention;
        _computeDelay = computeDelay ?? (_ => TimeSpan.Zero);
    }

    private readonly Func<int, SiloRole> _roles;
    private readonly Retention? _retention;
    private readonly Func<int, TimeSpan> _computeDelay;

    public const int Silos = 3;
    public readonly string DataDir = Directory.CreateTempSubdirectory("cluster-data-").FullName;
    /// <summary>Grain state of all silos, in files: it outlives a killed silo, as Redis does for a real cluster.</summary>
    public string StateDir => Path.Combine(DataDir, "state");
    public TrainTest Data { get; }
    public InProcessTestCluster Cluster { get; private set; } = null!;
    public string DatasetSha256 => DatasetCache.Sha256Of(Data);

    public async Task InitializeAsync()
    {
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), Data, gzip: true);
        var builder = new InProcessTestClusterBuilder(Silos);
        var (dataDir, stateDir, roles, retention, computeDelay) = (DataDir, StateDir, _roles, _retention, _computeDelay);
        builder.ConfigureSilo((options, silo) =>
        {
            silo.AddFileGrainStorage(SiloSetup.StorageName, stateDir);
            // Silo names are "Primary", then "Secondary_1", "Secondary_2", ...
            int index = options.SiloName.LastIndexOf('_') is var u and >= 0 ? int.Parse(options.SiloName[(u + 1)..]) : 0;
            silo.AddBackpropGrains(dataDir, allowFetch: false, role: roles(index), retention: retention);
            if (computeDelay(index) > TimeSpan.Zero) silo.DelayWorkersForTests(computeDelay(index));
            silo.Configure<SiloMessagingOptions>(o => o.ResponseTimeout = TimeSpan.FromSeconds(30));
        });
        // The client learns the silos' grain classes from a gateway's manifest and refreshes it every minute by default:
        // a client that first asked before a role silo's classes were known would fail for up to a minute.
        builder.ConfigureClient(client =>
        {
            client.Configure<TypeManagementOptions>(o => o.TypeMapRefreshInterval = TimeSpan.FromMilliseconds(200));
            client.Services.AddBackpropExceptions();
        });
        Cluster = builder.Build();
        await Cluster.DeployAsync();
        // Until the client's manifest has every grain class (a role cluster's registry and workers live on some silos
        // only), asking for one throws ArgumentException: no implementation.
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (true)
        {
            try
            {
                Cluster.Client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key);
                Cluster.Client.GetGrain<IWorkerGrain>("probe/1.0/0");
                return;
            }
            catch (ArgumentException) when (clock.Elapsed < TimeSpan.FromSeconds(30))
            {
                await Task.Delay(20);
            }
        }
    }

    /// <summary>Starts a run whose coordinator (and so its parameter server) is placed on <paramref name="silo"/>.</summary>
    public async Task<RunStatus> StartOn(InProcessSiloHandle silo, string runId, RunSpec spec)
    {
        RequestContext.Set(IPlacementDirector.PlacementHintKey, silo.SiloAddress);
        try
        {
            var status = await Cluster.Client.GetGrain<IRunGrain>(runId).Start(spec);
            Assert.Equal(silo.SiloAddress.Endpoint.ToString(), status.CoordinatorSilo);
            return status;
        }
        finally
        {
            RequestContext.Clear();
        }
    }

    async ValueTask IAsyncDisposable.DisposeAsync() => await DisposeAsync();

    public async Task DisposeAsync()
    {
        await Cluster.StopAllSilosAsync();
        await Cluster.DisposeAsync();
        Directory.Delete(DataDir, recursive: true);
    }
}

[CollectionDefinition("cluster", DisableParallelization = true)]
public sealed class ClusterCollection : ICollectionFixture<ClusterFixture>;
