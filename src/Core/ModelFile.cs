using System.Buffers;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using Backprop.Core.Model;
using MessagePack;

namespace Backprop.Core;

/// <summary>
/// A trained model on disk, in MessagePack:
///   [ "backprop-distributed-model", formatVersion, [layer sizes], activation, loss, info {string: string},
///     parameters (bin, little-endian float32), sha256(parameters) (bin) ]
/// Loading checks every field, so a damaged or foreign file fails with a message that says which.
/// </summary>
public static class ModelFile
{
    public const string Magic = "backprop-distributed-model";
    public const int FormatVersion = 1;

    public sealed record Contents(ModelSpec Spec, float[] Parameters, IReadOnlyDictionary<string, string> Info);

    public static void Save(string path, ModelSpec spec, ReadOnlySpan<float> parameters, IReadOnlyDictionary<string, string>? info = null)
    {
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("model files are written on little-endian machines");
        var bytes = MemoryMarshal.AsBytes(parameters);
        var buffer = new ArrayBufferWriter<byte>();
        var writer = new MessagePackWriter(buffer);
        writer.WriteArrayHeader(8);
        writer.Write(Magic);
        writer.Write(FormatVersion);
        writer.WriteArrayHeader(spec.Layers.Length);
        foreach (var n in spec.Layers) writer.Write(n);
        writer.Write(spec.Activation.ToString());
        writer.Write(spec.Loss.ToString());
        info ??= new Dictionary<string, string>();
        writer.WriteMapHeader(info.Count);
        foreach (var (k, v) in info) { writer.Write(k); writer.Write(v); }
        writer.Write(bytes);
        writer.Write(SHA256.HashData(bytes));
        writer.Flush();
        var dir = Path.GetDirectoryName(Path.GetFullPath(path));
        if (dir is not null) Directory.CreateDirectory(dir);
        File.WriteAllBytes(path + ".partial", buffer.WrittenSpan.ToArray());
        File.Move(path + ".partial", path, overwrite: true);
    }

    /// <summary>Reads a model file; throws <see cref="InvalidDataException"/> naming the file and the defect.</summary>
    public static Contents Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: model file not found", path);
        var data = File.ReadAllBytes(path);
        try
        {
            return Parse(data);
        }
        catch (Exception e) when (e is MessagePackSerializationException or EndOfStreamException or ArgumentException or OverflowException)
        {
            throw new InvalidDataException($"{path}: not a readable Backprop.Distributed model file ({e.Message})");
        }
        catch (InvalidDataException e)
        {
            throw new InvalidDataException($"{path}: {e.Message}");
        }
    }

    private static Contents Parse(byte[] data)
    {
        var reader = new MessagePackReader(data);
        if (reader.NextMessagePackType != MessagePackType.Array || reader.ReadArrayHeader() != 8)
            throw new InvalidDataException("not a Backprop.Distributed model file (no model header)");
        if (reader.NextMessagePackType != MessagePackType.String || reader.ReadString() != Magic)
            throw new InvalidDataException("not a Backprop.Distributed model file (wrong magic string)");
        int version = reader.ReadInt32();
        if (version != FormatVersion)
            throw new InvalidDataException($"model format version {version} is not supported (this build reads version {FormatVersion})");
        int layerCount = reader.ReadArrayHeader();
        if (layerCount < 2 || layerCount > 64) throw new InvalidDataException($"{layerCount} layer sizes is not a valid model");
        var layers = new int[layerCount];
        for (int i = 0; i < layerCount; i++) layers[i] = reader.ReadInt32();
        var activation = Enum.Parse<Activation>(reader.ReadString() ?? "");
        var loss = Enum.Parse<Loss>(reader.ReadString() ?? "");
        var spec = new ModelSpec(layers, activation, loss);
        spec.Validate();
        int infoCount = reader.ReadMapHeader();
        var info = new Dictionary<string, string>();
        for (int i = 0; i < infoCount; i++) info[reader.ReadString() ?? ""] = reader.ReadString() ?? "";
        var parameterBytes = reader.ReadBytes()?.ToArray() ?? throw new InvalidDataException("parameters are missing");
        var checksum = reader.ReadBytes()?.ToArray() ?? throw new InvalidDataException("checksum is missing");
        if (!reader.End) throw new InvalidDataException("unexpected bytes after the checksum");
        long expected = spec.ParameterCount * sizeof(float);
        if (parameterBytes.Length != expected)
            throw new InvalidDataException($"has {parameterBytes.Length} parameter bytes; the spec {spec.Describe()} needs {expected}");
        if (!SHA256.HashData(parameterBytes).AsSpan().SequenceEqual(checksum))
            throw new InvalidDataException("checksum mismatch: the parameters are damaged");
        return new Contents(spec, MemoryMarshal.Cast<byte, float>(parameterBytes).ToArray(), info);
    }
}
