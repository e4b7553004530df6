using System.Buffers;
using System.Collections.Concurrent;
using System.Reflection;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Orleans.Networking.Shared;

namespace Backprop.Grains.Hosting;

/// <summary>
/// Larger buffers under a silo's TCP connections. Orleans receives into one block of its memory pool per socket read,
/// and its pools' blocks are 4 KB: a 437 KB push arrives in ~100 reads, each a wake-up of the connection's reader, and
/// a 7.5 MB one in ~1,800. With 256 KB blocks a read takes what the socket holds. Measured with `bench wire` (silo to
/// silo on loopback, bench/README "Wire"): 1.7x (7.5 MB) to 2.8x (437 KB) the round trips' GB/s.
/// Orleans 10.4.2 has two pools and lets only its own code choose either, so both are set by name: the connections a
/// silo accepts take theirs from <c>SocketConnectionOptions.MemoryPoolFactory</c> (internal), the ones it dials (and
/// Orleans' message writer) from the <c>SharedMemoryPool</c> singleton (an internal class). <see cref="AddLargeConnectionBlocks"/>
/// throws when either is gone, and <c>ConnectionBlocksTests</c> checks both ends of a connection between two running silos.
/// </summary>
public static class ConnectionBlocks
{
    /// <summary>One block: big enough that a read rarely stops at its end, small enough that an idle connection holding one costs little.</summary>
    public const int BlockBytes = 256 * 1024;

    private const BindingFlags Internal = BindingFlags.Instance | BindingFlags.NonPublic;

    private static readonly PropertyInfo? Factory = typeof(SocketConnectionOptions).GetProperty("MemoryPoolFactory", Internal);

    private static readonly Type? SharedPoolType = typeof(SocketConnectionOptions).Assembly.GetType("Orleans.Networking.Shared.SharedMemoryPool");

    private static readonly FieldInfo? SharedPoolField = SharedPoolType?.GetField("<Pool>k__BackingField", Internal);

    /// <summary>Makes every socket connection of a silo of these services, accepted or dialled, read and write <see cref="BlockPool"/>'s blocks.</summary>
    public static IServiceCollection AddLargeConnectionBlocks(this IServiceCollection services)
    {
        if (Factory?.PropertyType != typeof(Func<MemoryPool<byte>>))
            throw new InvalidOperationException("this Orleans version's SocketConnectionOptions has no MemoryPoolFactory: see ConnectionBlocks");
        if (SharedPoolType is null || SharedPoolField?.FieldType != typeof(MemoryPool<byte>) || SharedPoolType.GetConstructor(Internal | BindingFlags.Public, Type.EmptyTypes) is null)
            throw new InvalidOperationException("this Orleans version has no SharedMemoryPool with a settable pool: see ConnectionBlocks");
        services.Configure<SocketConnectionOptions>(o => Factory.SetValue(o, (Func<MemoryPool<byte>>)(() => new BlockPool())));
        // Registered by Orleans before a silo's configuration runs: this one replaces it.
        services.Replace(ServiceDescriptor.Singleton(SharedPoolType, _ =>
        {
            var shared = Activator.CreateInstance(SharedPoolType, nonPublic: true)!;
            ((IDisposable?)SharedPoolField.GetValue(shared))?.Dispose();   // Orleans' own slab pool, never used
            SharedPoolField.SetValue(shared, new BlockPool());
            return shared;
        }));
        return services;
    }

    /// <summary>The pool an options object will give the connections a silo accepts (null: not this class's).</summary>
    public static MemoryPool<byte>? PoolOf(SocketConnectionOptions options) =>
        (Factory?.GetValue(options) as Func<MemoryPool<byte>>)?.Invoke();

    /// <summary>The pool of the connections a silo dials and of Orleans' message writer, in these services.</summary>
    public static MemoryPool<byte>? SharedPoolOf(IServiceProvider services) =>
        SharedPoolType is null ? null : SharedPoolField?.GetValue(services.GetRequiredService(SharedPoolType)) as MemoryPool<byte>;

    /// <summary>
    /// Blocks of <see cref="BlockBytes"/> from a <see cref="BlockStore"/> (by default the process's, shared by all its pools);
    /// a larger request gets an array of its size, not kept. The blocks are these pools' alone: what a connection read
    /// (decrypted bytes too, under TLS) is never lent to other code of the process.
    /// </summary>
    public sealed class BlockPool(BlockStore? store = null) : MemoryPool<byte>
    {
        private readonly BlockStore _store = store ?? BlockStore.Process;

        /// <summary>
        /// What a caller may ask of one block. Orleans' message writer asks no more and writes a large message into blocks;
        /// a pipe asked for more (the rest of such a message, copied in whole) takes it from <c>ArrayPool&lt;byte&gt;.Shared</c>, not from here.
        /// </summary>
        public override int MaxBufferSize => BlockBytes;

        public override IMemoryOwner<byte> Rent(int minBufferSize = -1) =>
            new Block(_store, minBufferSize > BlockBytes ? new byte[minBufferSize] : _store.Take());

        protected override void Dispose(bool disposing) { }

        private sealed class Block(BlockStore store, byte[] array) : IMemoryOwner<byte>
        {
            private byte[]? _array = array;

            public Memory<byte> Memory => _array ?? throw new ObjectDisposedException(nameof(Block));

            public void Dispose()
            {
                if (Interlocked.Exchange(ref _array, null) is { } array) store.Return(array);
            }
        }
    }

    /// <summary>
    /// Blocks of <see cref="BlockBytes"/> kept for reuse: as many as were ever in use at once, and at least <c>keep</c>
    /// (Orleans' own pool also keeps what it once needed). A shard taking pushes from many workers at once holds ~30 blocks
    /// per 7.5 MB in flight: dropping those after every step would leave ~90 MB a step to the full GCs that the pinned
    /// object heap waits for. They live in the pinned object heap: the GC never moves them, so a socket pinning one for a
    /// read or write fragments nothing, and a block in use is not copied from generation to generation (the silo and the
    /// CLI raise the large object threshold to 4 MB, so a plain 256 KB array would start in generation 0).
    /// </summary>
    public sealed class BlockStore(int keep)
    {
        /// <summary>The process's, keeping at least 128 blocks (32 MB) once they have been in use.</summary>
        public static readonly BlockStore Process = new(128);

        private readonly ConcurrentBag<byte[]> _kept = [];
        private int _count, _inUse, _peak;

        /// <summary>Blocks waiting for reuse now.</summary>
        public int Kept => Volatile.Read(ref _count);

        /// <summary>The most blocks lent at once so far.</summary>
        public int Peak => Volatile.Read(ref _peak);

        public byte[] Take()
        {
            int inUse = Interlocked.Increment(ref _inUse);
            for (int peak = Volatile.Read(ref _peak); inUse > peak; peak = Volatile.Read(ref _peak))
                if (Interlocked.CompareExchange(ref _peak, inUse, peak) == peak) break;
            if (!_kept.TryTake(out var array)) return GC.AllocateUninitializedArray<byte>(BlockBytes, pinned: true);
            Interlocked.Decrement(ref _count);
            return array;
        }

        public void Return(byte[] array)
        {
            if (array.Length != BlockBytes) return;
            Interlocked.Decrement(ref _inUse);
            if (Interlocked.Increment(ref _count) <= Math.Max(keep, Peak)) _kept.Add(array);
            else Interlocked.Decrement(ref _count);
        }
    }
}
