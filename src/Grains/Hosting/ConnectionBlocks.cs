using System.Buffers;
using System.Reflection;
using Microsoft.Extensions.DependencyInjection;
using Orleans.Networking.Shared;

namespace Backprop.Grains.Hosting;

/// <summary>
/// Larger buffers under the TCP connections a silo accepts. Orleans receives into one block of its memory pool per
/// socket read, and its pool's blocks are 4 KB: a 437 KB push arrives in ~100 reads, each a wake-up of the connection's
/// reader, and a 7.5 MB one in ~1,800. With 256 KB blocks a read takes what the socket holds. Measured with `bench wire`
/// (silo to silo on loopback, bench/README "Wire"): ~1.3x the round trips' GB/s for both models.
/// Orleans 10.4.2 lets only its own code choose the pool (<c>SocketConnectionOptions.MemoryPoolFactory</c> is
/// internal), so it is set by name; <see cref="Install"/> throws when that property is gone, and a test keeps it honest.
/// The option reaches only Orleans' listeners (silo and gateway ports): a connection Orleans dials, silo to silo or a
/// client's to its gateway, reads into Orleans' own shared pool. Two silos share one connection, dialled by the one that
/// called first, so one direction of each pair's traffic is read into these blocks and the other is not.
/// </summary>
public static class ConnectionBlocks
{
    /// <summary>One block: big enough that a read rarely stops at its end, small enough that an idle connection holding one costs little.</summary>
    public const int BlockBytes = 256 * 1024;

    private static readonly PropertyInfo? Factory =
        typeof(SocketConnectionOptions).GetProperty("MemoryPoolFactory", BindingFlags.Instance | BindingFlags.NonPublic);

    /// <summary>Makes the socket connections that a silo of these services accepts use <see cref="BlockPool"/> (not the ones it dials).</summary>
    public static IServiceCollection AddLargeConnectionBlocks(this IServiceCollection services) =>
        services.Configure<SocketConnectionOptions>(Install);

    /// <summary>Sets the options' pool to <see cref="BlockPool"/>; throws when this Orleans has no pool to set.</summary>
    public static void Install(SocketConnectionOptions options)
    {
        if (Factory?.PropertyType != typeof(Func<MemoryPool<byte>>))
            throw new InvalidOperationException("this Orleans version's SocketConnectionOptions has no MemoryPoolFactory: see ConnectionBlocks");
        Factory.SetValue(options, (Func<MemoryPool<byte>>)(() => new BlockPool()));
    }

    /// <summary>The pool an options object will give its connections (null: not this class's).</summary>
    public static MemoryPool<byte>? PoolOf(SocketConnectionOptions options) =>
        (Factory?.GetValue(options) as Func<MemoryPool<byte>>)?.Invoke();

    /// <summary>
    /// Blocks of at least <see cref="BlockBytes"/> from the shared array pool. Socket reads and writes pin a block only while
    /// they run; arrays this large live in the large object heap, which the GC does not move.
    /// </summary>
    public sealed class BlockPool : MemoryPool<byte>
    {
        public override int MaxBufferSize => int.MaxValue;

        public override IMemoryOwner<byte> Rent(int minBufferSize = -1) => new Block(ArrayPool<byte>.Shared.Rent(Math.Max(BlockBytes, minBufferSize)));

        protected override void Dispose(bool disposing) { }

        private sealed class Block(byte[] array) : IMemoryOwner<byte>
        {
            private byte[]? _array = array;

            public Memory<byte> Memory => _array ?? throw new ObjectDisposedException(nameof(Block));

            public void Dispose()
            {
                if (Interlocked.Exchange(ref _array, null) is { } array) ArrayPool<byte>.Shared.Return(array);
            }
        }
    }
}
