using System.Buffers.Binary;
using System.IO.Compression;

namespace Backprop.Core.Data;

/// <summary>
/// Reads IDX files (MNIST and its relatives): a big-endian header — two zero bytes, a type byte (0x08 =
/// unsigned byte), the number of dimensions — then one int32 per dimension, then the data. Raw or gzip
/// (recognised by its magic bytes, whatever the file is called). Every defect is reported with the file
/// name, and the header's sizes are checked before anything of that size is allocated.
/// </summary>
public static class IdxReader
{
    public const int MaxItems = 50_000_000;
    public const int MaxSide = 4096;
    private const int MaxPayload = int.MaxValue - 1024;

    public sealed record Images(int Count, int Rows, int Cols, byte[] Pixels);

    public static Images ReadImages(string path)
    {
        var (dims, data) = Read(path, expectedDims: 3, kind: "image");
        return new Images(dims[0], dims[1], dims[2], data);
    }

    public static byte[] ReadLabels(string path, int classes)
    {
        var (_, data) = Read(path, expectedDims: 1, kind: "label");
        for (int i = 0; i < data.Length; i++)
            if (data[i] >= classes)
                throw new DataFileException(path, $"label {data[i]} at index {i} is outside 0..{classes - 1}");
        return data;
    }

    private static (int[] Dims, byte[] Data) Read(string path, int expectedDims, string kind)
    {
        if (!File.Exists(path)) throw new DataFileException(path, "file not found");
        using var file = File.OpenRead(path);
        bool gzip = file.Length >= 2 && file.ReadByte() == 0x1f && file.ReadByte() == 0x8b;
        file.Position = 0;
        using Stream stream = gzip ? new GZipStream(file, CompressionMode.Decompress) : file;
        try
        {
            return ReadStream(path, stream, gzip ? null : file.Length, expectedDims, kind);
        }
        catch (InvalidDataException e)
        {
            throw new DataFileException(path, $"damaged gzip stream ({e.Message})");
        }
    }

    private static (int[] Dims, byte[] Data) ReadStream(string path, Stream stream, long? rawLength, int expectedDims, string kind)
    {
        Span<byte> magic = stackalloc byte[4];
        if (ReadFully(stream, magic) < 4) throw new DataFileException(path, "truncated: shorter than the 4-byte IDX magic number");
        uint expectedMagic = 0x0800u | (uint)expectedDims;
        uint actual = BinaryPrimitives.ReadUInt32BigEndian(magic);
        if (actual != expectedMagic)
            throw new DataFileException(path,
                $"bad magic number 0x{actual:X8}: an IDX {kind} file starts with 0x{expectedMagic:X8} (unsigned bytes, {expectedDims} dimension{(expectedDims == 1 ? "" : "s")})");

        Span<byte> header = stackalloc byte[4 * expectedDims];
        if (ReadFully(stream, header) < header.Length)
            throw new DataFileException(path, "truncated inside the header's dimensions");
        var dims = new int[expectedDims];
        long payload = 1;
        for (int d = 0; d < expectedDims; d++)
        {
            dims[d] = BinaryPrimitives.ReadInt32BigEndian(header.Slice(4 * d));
            int limit = d == 0 ? MaxItems : MaxSide;
            if (dims[d] < 1 || dims[d] > limit)
                throw new DataFileException(path, $"dimension {d} is {dims[d]}, outside the supported 1..{limit}");
            payload *= dims[d];
        }
        if (payload > MaxPayload) throw new DataFileException(path, $"header claims {payload} bytes of data, more than this reader supports");

        long headerBytes = 4 + header.Length;
        if (rawLength is long length && length != headerBytes + payload)
        {
            throw new DataFileException(path, length < headerBytes + payload
                ? $"truncated: header promises {payload} data bytes ({string.Join(" x ", dims)}), file has {length - headerBytes}"
                : $"{length - headerBytes - payload} unexpected bytes after the {payload} data bytes the header promises");
        }

        // Grow as data actually arrives, so a compressed file with a lying header cannot make us allocate its claim.
        var data = new byte[Math.Min(payload, 1 << 24)];
        long filled = 0;
        while (filled < payload)
        {
            if (filled == data.Length) Array.Resize(ref data, (int)Math.Min(payload, (long)data.Length * 2));
            int n = stream.Read(data, (int)filled, (int)(data.Length - filled));
            if (n == 0)
                throw new DataFileException(path, $"truncated: header promises {payload} data bytes ({string.Join(" x ", dims)}), file has {filled}");
            filled += n;
        }
        if (rawLength is null && stream.ReadByte() >= 0)
            throw new DataFileException(path, $"unexpected bytes after the {payload} data bytes the header promises");
        return (dims, data);
    }

    private static int ReadFully(Stream stream, Span<byte> buffer)
    {
        int total = 0;
        while (total < buffer.Length)
        {
            int n = stream.Read(buffer.Slice(total));
            if (n == 0) break;
            total += n;
        }
        return total;
    }
}
