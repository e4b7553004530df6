using System.Runtime.InteropServices;
using Orleans.Serialization.Buffers;
using Orleans.Serialization.Cloning;
using Orleans.Serialization.Codecs;
using Orleans.Serialization.WireProtocol;

namespace Backprop.Grains.Messages;

/// <summary>
/// A parameter or gradient vector in a message. Immutable once sent: inside a silo it passes by reference,
/// across silos it is written as one length-prefixed block of little-endian floats (Orleans' default
/// float[] codec writes each element with its own tag, several times slower — see ORLEANS-10-FACTS).
/// </summary>
[Immutable]
public sealed class FloatPayload(float[] values)
{
    private readonly float[] _values = values;

    public int Length => _values.Length;
    public ReadOnlySpan<float> Span => _values;
    public ReadOnlyMemory<float> Memory => _values;
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
        var values = new float[length / sizeof(float)];
        reader.ReadBytes(MemoryMarshal.AsBytes(values.AsSpan()));
        var result = new FloatPayload(values);
        ReferenceCodec.RecordObject(reader.Session, result);
        return result;
    }
}

[RegisterCopier]
public sealed class FloatPayloadCopier : IDeepCopier<FloatPayload>
{
    public FloatPayload? DeepCopy(FloatPayload? input, CopyContext context) => input;
}
