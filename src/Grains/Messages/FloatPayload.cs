using System.Runtime.InteropServices;
using Orleans.Serialization.Buffers;
using Orleans.Serialization.Cloning;
using Orleans.Serialization.Codecs;
using Orleans.Serialization.WireProtocol;

namespace Backprop.Grains.Messages;

/// <summary>
/// A parameter or gradient vector in a message. Immutable once sent: inside a silo it passes by reference (no
/// copy), across silos it is written as one length-prefixed block of little-endian floats (Orleans' default
/// float[] codec writes each element with its own tag, several times slower — see ORLEANS-10-FACTS).
/// A payload read from the wire lives in an array rented from <see cref="Pool"/>: its final reader gives it
/// back with <see cref="Release"/>, so that a step's messages allocate no vectors once warm. A payload that is
/// not released is simply collected.
/// </summary>
[Immutable]
public sealed class FloatPayload
{
    /// <summary>Arrays of received payloads (up to the 64 MiB message cap), a few per size, reused across steps.</summary>
    internal static readonly System.Buffers.ArrayPool<float> Pool =
        System.Buffers.ArrayPool<float>.Create((int)(Backprop.Core.ResourceLimits.MaxMessageBytes / sizeof(float)), maxArraysPerBucket: 16);

    private float[]? _rented;
    private ReadOnlyMemory<float> _values;
    private Action? _released;

    public FloatPayload(float[] values) => _values = values;

    /// <summary>A view of memory that the sender keeps unchanged until the receiver is done with it.</summary>
    public FloatPayload(ReadOnlyMemory<float> values) => _values = values;

    private FloatPayload(float[] rented, int length) => (_rented, _values) = (rented, rented.AsMemory(0, length));

    public int Length => _values.Length;
    public ReadOnlySpan<float> Span => _values.Span;
    public ReadOnlyMemory<float> Memory => _values;

    /// <summary>
    /// Gives a received payload's array back to the pool; nothing for one passed by reference. Only the last
    /// reader may call it: the values are gone afterwards.
    /// </summary>
    public void Release()
    {
        var rented = Interlocked.Exchange(ref _rented, null);
        if (rented is null) return;
        _values = default;
        Pool.Return(rented);
        Interlocked.Exchange(ref _released, null)?.Invoke();
    }

    /// <summary>Runs <paramref name="released"/> once this rented payload is given back (a data lane's memory budget).</summary>
    internal void OnRelease(Action released) => _released = released;

    internal static FloatPayload Rent(int length) => length == 0 ? new FloatPayload(Array.Empty<float>()) : new(Pool.Rent(length), length);

    /// <summary>The rented array behind a payload being read, to fill.</summary>
    internal Span<float> Filling => _rented is null ? Span<float>.Empty : _rented.AsSpan(0, _values.Length);

    /// <summary>The bytes of <see cref="Filling"/>, for a socket to read into.</summary>
    internal Memory<byte> FillingBytes => _rented is null ? Memory<byte>.Empty : FloatBytes.Of(_rented, 0, _values.Length);

    /// <summary>The values' bytes, for a socket to write from.</summary>
    internal ReadOnlyMemory<byte> Bytes => FloatBytes.Of(_values);
}

[RegisterSerializer]
public sealed class FloatPayloadCodec : IFieldCodec<FloatPayload>
{

    public void WriteField<TBufferWriter>(ref Writer<TBufferWriter> writer, uint fieldIdDelta, Type? expectedType, FloatPayload? value)
        where TBufferWriter : System.Buffers.IBufferWriter<byte>
    {
        if (ReferenceCodec.TryWriteReferenceField(ref writer, fieldIdDelta, expectedType, value)) return;
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("payloads are little-endian");
        var bytes = MemoryMarshal.AsBytes(value!.Span);
        writer.WriteFieldHeader(fieldIdDelta, expectedType, typeof(FloatPayload), WireType.LengthPrefixed);
        writer.WriteVarUInt32((uint)bytes.Length);
        writer.Write(bytes);
    }

    public FloatPayload ReadValue<TInput>(ref Reader<TInput> reader, Field field)
    {
        if (field.WireType == WireType.Reference) return ReferenceCodec.ReadReference<FloatPayload, TInput>(ref reader, field)!;
        field.EnsureWireType(WireType.LengthPrefixed);
        uint length = reader.ReadVarUInt32();
        if (length % sizeof(float) != 0) throw new InvalidDataException($"payload of {length} bytes is not a float vector");
        // Checked before allocating: a length prefix is whatever the sender wrote.
        if (length > Backprop.Core.ResourceLimits.MaxMessageBytes)
            throw new InvalidDataException($"payload of {Backprop.Core.ResourceLimits.Bytes(length)} is over the {Backprop.Core.ResourceLimits.Bytes(Backprop.Core.ResourceLimits.MaxMessageBytes)} limit");
        var result = FloatPayload.Rent((int)(length / sizeof(float)));
        reader.ReadBytes(MemoryMarshal.AsBytes(result.Filling));
        ReferenceCodec.RecordObject(reader.Session, result);
        return result;
    }
}

[RegisterCopier]
public sealed class FloatPayloadCopier : IDeepCopier<FloatPayload>
{
    public FloatPayload? DeepCopy(FloatPayload? input, CopyContext context) => input;
}
