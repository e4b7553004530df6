using Backprop.Grains.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Options;
using Orleans.Networking.Shared;

namespace Backprop.Tests.Cluster;

/// <summary>
/// Every silo's TCP connections read into the large blocks of <see cref="ConnectionBlocks"/>: the property it sets
/// by name exists in this Orleans, and a silo built as the product builds one gets the pool.
/// </summary>
public sealed class ConnectionBlocksTests
{
    [Fact]
    public void A_silo_with_the_backprop_grains_reads_its_connections_into_large_blocks()
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
        using var pool = new ConnectionBlocks.BlockPool();
        using var block = pool.Rent(ConnectionBlocks.BlockBytes + 1);
        Assert.True(block.Memory.Length > ConnectionBlocks.BlockBytes);
    }
}
