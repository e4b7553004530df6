using System.Buffers.Binary;
using System.IO.Compression;

namespace Backprop.Core.Data;

/// <summary>Writes IDX files (raw, or gzip when the path ends in .gz): for generated test and benchmark data.</summary>
public static class IdxWriter
{
    public static void WriteImages(string path, int count, int rows, int cols, ReadOnlySpan<byte> pixels) =>
        Write(path, 3, [count, rows, cols], pixels);

    public static void WriteLabels(string path, ReadOnlySpan<byte> labels) => Write(path, 1, [labels.Length], labels);

    public static void WriteDataset(string dir, TrainTest data, bool gzip = false)
    {
        Directory.CreateDirectory(dir);
        string ext = gzip ? ".gz" : "";
        foreach (var (set, images, labels) in new[]
                 {
                     (data.Train, DatasetCatalog.TrainImages, DatasetCatalog.TrainLabels),
                     (data.Test, DatasetCatalog.TestImages, DatasetCatalog.TestLabels),
                 })
        {
            WriteImages(Path.Combine(dir, images + ext), set.Count, set.Rows, set.Cols, set.Pixels);
            WriteLabels(Path.Combine(dir, labels + ext), set.Labels);
        }
    }

    private static void Write(string path, int dims, int[] sizes, ReadOnlySpan<byte> data)
    {
        using var file = File.Create(path);
        using Stream stream = path.EndsWith(".gz", StringComparison.Ordinal) ? new GZipStream(file, CompressionLevel.Fastest) : file;
        Span<byte> header = stackalloc byte[4 + 4 * dims];
        header[2] = 0x08;
        header[3] = (byte)dims;
        for (int d = 0; d < dims; d++) BinaryPrimitives.WriteInt32BigEndian(header.Slice(4 + 4 * d), sizes[d]);
        stream.Write(header);
        stream.Write(data);
    }
}
