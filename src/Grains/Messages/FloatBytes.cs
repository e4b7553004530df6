using System.Buffers;
using System.Runtime.InteropServices;

namespace Backprop.Grains.Messages;

/// <summary>
/// The bytes of a slice of a float array as <see cref="Memory{T}"/> of bytes, so that a socket reads into or writes
/// from a payload's own array (no copy through a byte buffer). Little-endian machines only, like the payload codec.
/// </summary>
internal sealed class FloatBytes(float[] array, int start, int length) : MemoryManager<byte>
{
    public static Memory<byte> Of(float[] array, int start, int length) =>
        length == 0 ? Memory<byte>.Empty : new FloatBytes(array, start, length).Memory;

    /// <summary>The bytes of an array-backed float memory (every payload is).</summary>
    public static ReadOnlyMemory<byte> Of(ReadOnlyMemory<float> values) =>
        values.IsEmpty ? ReadOnlyMemory<byte>.Empty
        : MemoryMarshal.TryGetArray(values, out var segment) ? Of(segment.Array!, segment.Offset, segment.Count)
        : MemoryMarshal.AsBytes(values.Span).ToArray();

    public override Span<byte> GetSpan() => MemoryMarshal.AsBytes(array.AsSpan(start, length));

    public override unsafe MemoryHandle Pin(int elementIndex = 0)
    {
        var handle = GCHandle.Alloc(array, GCHandleType.Pinned);
        return new MemoryHandle((byte*)handle.AddrOfPinnedObject() + (long)start * sizeof(float) + elementIndex, handle);
    }

    public override void Unpin() { }

    protected override void Dispose(bool disposing) { }
}
