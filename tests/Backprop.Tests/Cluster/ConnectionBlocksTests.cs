using System.Collections;
using System.Net;
using System.Reflection;
using Backprop.Grains.Hosting;
using Microsoft.AspNetCore.Connections;
using Microsoft.AspNetCore.Connections.Features;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Orleans.Networking.Shared;
using System.Buffers;

namespace Backprop.Tests.Cluster;

/// <summary>
/// A silo's connections read into the large blocks of <see cref="ConnectionBlocks"/>: the internals it sets by name exist
/// in this Orleans, a silo built as the product builds one gets the pools, and both ends of a connection between two
/// running silos (the one that accepted it and the one that dialled it) use them.
/// </summary>
public sealed class ConnectionBlocksTests
{
    [Fact]
    public void A_silo_with_the_backprop_grains_gives_orleans_the_pool_of_large_blocks()
    {
        var dataDir = Directory.CreateTempSubdirectory("blocks-").FullName;
        try
        {
            var builder = Host.CreateApplicationBuilder();
            builder.UseOrleans(silo => silo.UseLocalhostClustering(LocalClustering.FreePort(), LocalClustering.FreePort()).AddBackpropGrains(dataDir, allowFetch: false));
            using var host = builder.Build();
            var options = host.Services.GetRequiredService<IOptions<SocketConnectionOptions>>().Value;
            using var pool = ConnectionBlocks.PoolOf(options);
            Assert.IsType<ConnectionBlocks.BlockPool>(pool);
            Assert.IsType<ConnectionBlocks.BlockPool>(ConnectionBlocks.SharedPoolOf(host.Services));
            Assert.IsType<ConnectionBlocks.BlockPool>(MessageWriterPool(host.Services));
            var block = pool!.Rent(2048);
            Assert.True(block.Memory.Length >= ConnectionBlocks.BlockBytes, $"a block of {block.Memory.Length} bytes");
            block.Dispose();
            Assert.Throws<ObjectDisposedException>(() => block.Memory);
            block.Dispose();
        }
        finally
        {
            Directory.Delete(dataDir, recursive: true);
        }
    }

    [Fact]
    public void Without_them_Orleans_keeps_its_own_pool()
    {
        var options = new ServiceCollection().AddOptions().BuildServiceProvider().GetRequiredService<IOptions<SocketConnectionOptions>>().Value;
        using var pool = ConnectionBlocks.PoolOf(options);
        Assert.NotNull(pool);
        Assert.IsNotType<ConnectionBlocks.BlockPool>(pool);
    }

    [Fact]
    public void A_request_larger_than_a_block_gets_what_it_asked_for()
    {
        using var pool = new ConnectionBlocks.BlockPool(new ConnectionBlocks.BlockStore(keep: 1));
        // Orleans' message writer asks for at most this much, so it writes a large message into blocks, not one array.
        Assert.Equal(ConnectionBlocks.BlockBytes, pool.MaxBufferSize);
        using var block = pool.Rent(ConnectionBlocks.BlockBytes + 1);
        Assert.True(block.Memory.Length > ConnectionBlocks.BlockBytes);
    }

    [Fact]
    public void A_returned_block_is_lent_again_and_the_store_keeps_what_was_once_in_use_at_once()
    {
        var store = new ConnectionBlocks.BlockStore(keep: 4);
        using var pool = new ConnectionBlocks.BlockPool(store);
        var first = pool.Rent();
        var array = first.Memory;
        first.Dispose();
        first.Dispose();   // a second dispose returns nothing twice
        Assert.Equal(1, store.Kept);
        using (var again = pool.Rent()) Assert.True(again.Memory.Span == array.Span, "the kept block was not lent again");
        // Ten in use at once (a burst of pushes): all ten are kept for the next burst, not dropped down to `keep`.
        var many = Enumerable.Range(0, 10).Select(_ => pool.Rent()).ToList();
        Assert.Equal(10, store.Peak);
        many.ForEach(b => b.Dispose());
        Assert.Equal(10, store.Kept);
        // Beyond what was ever in use at once nothing is kept (a block that was not the store's, returned to it).
        store.Return(new byte[ConnectionBlocks.BlockBytes]);
        Assert.Equal(10, store.Kept);
        using (pool.Rent(ConnectionBlocks.BlockBytes * 2)) { }   // an outsize block is not kept
        Assert.Equal(10, store.Kept);
        Assert.Equal(10, store.Peak);
    }

    [Fact]
    public unsafe void A_block_stays_where_it_is_when_the_gc_compacts()
    {
        // The silo and the CLI keep arrays under 4 MB out of the large object heap (LOHThreshold), so a block must not rely
        // on it: a gap left before the block, then a full compacting collection, would move a block that can move.
        var store = new ConnectionBlocks.BlockStore(keep: 1);
        var gap = new byte[4 * ConnectionBlocks.BlockBytes];
        var block = store.Take();
        GC.KeepAlive(gap);
        gap = null;
        nint before;
        fixed (byte* start = block) before = (nint)start;
        System.Runtime.GCSettings.LargeObjectHeapCompactionMode = System.Runtime.GCLargeObjectHeapCompactionMode.CompactOnce;
        GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
        fixed (byte* start = block) Assert.Equal(before, (nint)start);
        store.Return(block);
    }

    [Fact]
    public async Task Between_two_silos_both_the_accepting_and_the_dialling_end_read_into_large_blocks()
    {
        var dataDir = Directory.CreateTempSubdirectory("blocks-").FullName;
        var ports = Enumerable.Range(0, 4).Select(_ => LocalClustering.FreePort()).ToArray();
        var primary = new IPEndPoint(IPAddress.Loopback, ports[0]);
        IHost Silo(int siloPort, int gatewayPort)
        {
            var builder = Host.CreateApplicationBuilder();
            builder.Logging.ClearProviders();
            builder.UseOrleans(silo => silo.UseLocalCluster($"blocks-{ports[0]}", siloPort, gatewayPort, primary, MembershipSettings.Fast)
                .AddMemoryGrainStorage(SiloSetup.StorageName).AddBackpropGrains(dataDir, allowFetch: false, keepRunsGoing: false));
            return builder.Build();
        }
        using var first = Silo(ports[0], ports[1]);
        using var second = Silo(ports[2], ports[3]);
        try
        {
            await first.StartAsync();
            await second.StartAsync();
            // The second silo dialled the first to join; the first holds that connection once it has read its preamble.
            var clock = System.Diagnostics.Stopwatch.StartNew();
            while (Ends(first).Count == 0 || Ends(second).Count == 0)
            {
                Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), "the silos did not connect in 30 s");
                await Task.Delay(50);
            }
            var (atFirst, atSecond) = (Ends(first), Ends(second));
            // One TCP connection for the pair, used both ways: the second dialled, the first accepted (and needs no other).
            var accepted = Assert.Single(atFirst);
            var dialled = Assert.Single(atSecond);
            Assert.Equal((ports[0], dialled.LocalPort), (accepted.LocalPort, accepted.RemotePort));
            Assert.Equal(ports[0], dialled.RemotePort);
            Assert.IsType<ConnectionBlocks.BlockPool>(accepted.Pool);
            Assert.IsType<ConnectionBlocks.BlockPool>(dialled.Pool);
        }
        finally
        {
            await second.StopAsync();
            await first.StopAsync();
            Directory.Delete(dataDir, recursive: true);
        }
    }

    /// <summary>The pool Orleans' message writer (<c>MessageSerializer</c>, one per connection and direction) takes its overflow blocks from.</summary>
    private static MemoryPool<byte>? MessageWriterPool(IServiceProvider services)
    {
        const BindingFlags Any = BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic;
        var serializerType = typeof(SocketConnectionOptions).Assembly.GetType("Orleans.Runtime.Messaging.MessageSerializer", throwOnError: true)!;
        using var scope = services.CreateScope();
        var writer = serializerType.GetField("_bufferWriter", Any)!.GetValue(scope.ServiceProvider.GetRequiredService(serializerType))!;
        return writer.GetType().GetField("memoryPool", Any)!.GetValue(writer) as MemoryPool<byte>;
    }

    /// <summary>
    /// A silo's ends of its connections to other silos, as its connection manager holds them (Orleans' internals: this test
    /// must be rewritten if they change; a connection listed under two addresses of its peer counts once), each with its
    /// ports and its transport's memory pool.
    /// </summary>
    private static List<(int LocalPort, int RemotePort, MemoryPool<byte>? Pool)> Ends(IHost silo)
    {
        const BindingFlags Any = BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic;
        var orleans = typeof(SocketConnectionOptions).Assembly;
        var managerType = orleans.GetType("Orleans.Runtime.Messaging.ConnectionManager", throwOnError: true)!;
        var connectionType = orleans.GetType("Orleans.Runtime.Messaging.Connection", throwOnError: true)!;
        var byAddress = (IEnumerable)managerType.GetField("connections", Any)!.GetValue(silo.Services.GetRequiredService(managerType))!;
        var contexts = new HashSet<ConnectionContext>();
        foreach (var pair in byAddress)
        {
            var entry = pair.GetType().GetProperty("Value")!.GetValue(pair)!;
            foreach (var connection in (IEnumerable)entry.GetType().GetProperty("Connections", Any)!.GetValue(entry)!)
                contexts.Add((ConnectionContext)connectionType.GetProperty("Context", Any)!.GetValue(connection)!);
        }
        return contexts.Select(c => (((IPEndPoint)c.LocalEndPoint!).Port, ((IPEndPoint)c.RemoteEndPoint!).Port, c.Features.Get<IMemoryPoolFeature>()?.MemoryPool)).ToList();
    }
}
