using System.IO.Compression;
using Backprop.Core.Data;

namespace Backprop.Tests.Core;

public sealed class IdxReaderTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("idx-tests-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Path(string name) => System.IO.Path.Combine(_dir, name);

    private static byte[] Header(uint magic, params int[] dims)
    {
        var bytes = new byte[4 + 4 * dims.Length];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(bytes, magic);
        for (int d = 0; d < dims.Length; d++) System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(4 + 4 * d), dims[d]);
        return bytes;
    }

    private string Write(string name, params byte[][] parts)
    {
        var path = Path(name);
        File.WriteAllBytes(path, parts.SelectMany(p => p).ToArray());
        return path;
    }

    private static DataFileException Fails(Action read, string path, string containing)
    {
        var e = Assert.Throws<DataFileException>(read);
        Assert.Equal(path, e.Path);
        Assert.Contains(containing, e.Message);
        Assert.StartsWith(path, e.Message);
        return e;
    }

    [Fact]
    public void Reads_raw_and_gzip_files_alike()
    {
        var data = SyntheticDigits.Create(20, 5, seed: 3);
        IdxWriter.WriteDataset(Path("raw"), data);
        IdxWriter.WriteDataset(Path("gz"), data, gzip: true);
        var raw = DatasetCatalog.Load(Path("raw"), "x");
        var gz = DatasetCatalog.Load(Path("gz"), "x");
        Assert.Equal(data.Train.Pixels, raw.Train.Pixels);
        Assert.Equal(data.Train.Labels, gz.Train.Labels);
        Assert.Equal(data.Test.Pixels, gz.Test.Pixels);
        Assert.Equal((28, 28, 20), (gz.Train.Rows, gz.Train.Cols, gz.Train.Count));
    }

    [Fact]
    public void Bad_magic_number_is_named()
    {
        var path = Write("images", Header(0x00000801, 2), new byte[2]);
        Fails(() => IdxReader.ReadImages(path), path, "bad magic number 0x00000801");
    }

    [Fact]
    public void Zero_or_absurd_dimensions_are_rejected_before_allocating()
    {
        var zero = Write("zero", Header(0x00000803, 0, 28, 28));
        Fails(() => IdxReader.ReadImages(zero), zero, "dimension 0 is 0");
        var huge = Write("huge", Header(0x00000803, 40_000_000, 4096, 4096));
        Fails(() => IdxReader.ReadImages(huge), huge, "more than this reader supports");
        var side = Write("side", Header(0x00000803, 10, 100_000, 28));
        Fails(() => IdxReader.ReadImages(side), side, "dimension 1 is 100000");
    }

    [Fact]
    public void Truncated_raw_file_says_how_much_is_missing()
    {
        var path = Write("trunc", Header(0x00000803, 3, 2, 2), new byte[11]);
        Fails(() => IdxReader.ReadImages(path), path, "truncated: header promises 12 data bytes (3 x 2 x 2), file has 11");
        var header = Write("short-header", Header(0x00000803, 3, 2, 2).Take(9).ToArray());
        Fails(() => IdxReader.ReadImages(header), header, "truncated inside the header");
    }

    [Fact]
    public void Truncated_gzip_file_with_a_lying_header_fails_without_allocating_its_claim()
    {
        var path = Path("lie.gz");
        using (var gz = new GZipStream(File.Create(path), CompressionLevel.Fastest))
        {
            gz.Write(Header(0x00000803, 50_000_000, 40, 1));   // claims 2 GB
            gz.Write(new byte[100]);
        }
        long before = GC.GetAllocatedBytesForCurrentThread();
        Fails(() => IdxReader.ReadImages(path), path, "file has 100");
        Assert.True(GC.GetAllocatedBytesForCurrentThread() - before < 200_000_000, "reader allocated the header's claim");
    }

    [Fact]
    public void Trailing_bytes_are_reported()
    {
        var path = Write("long", Header(0x00000801, 2), new byte[3]);
        Fails(() => IdxReader.ReadLabels(path, 10), path, "1 unexpected bytes");
    }

    [Fact]
    public void Damaged_gzip_stream_is_reported()
    {
        var path = Write("bad.gz", [0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        Fails(() => IdxReader.ReadLabels(path, 10), path, "damaged gzip");
    }

    [Fact]
    public void Label_out_of_range_is_named_with_its_index()
    {
        var path = Write("labels", Header(0x00000801, 4), [1, 2, 10, 3]);
        Fails(() => IdxReader.ReadLabels(path, 10), path, "label 10 at index 2 is outside 0..9");
    }

    [Fact]
    public void Image_and_label_count_mismatch_names_both_files()
    {
        var data = SyntheticDigits.Create(20, 5, seed: 3);
        var dir = Path("mismatch");
        IdxWriter.WriteDataset(dir, data);
        IdxWriter.WriteLabels(System.IO.Path.Combine(dir, DatasetCatalog.TrainLabels), data.Train.Labels.AsSpan(0, 19));
        var e = Assert.Throws<DataFileException>(() => DatasetCatalog.Load(dir, "x"));
        Assert.Contains("has 19 labels but train-images-idx3-ubyte has 20 images", e.Message);
    }

    [Fact]
    public void Missing_file_is_named()
    {
        var e = Assert.Throws<DataFileException>(() => DatasetCatalog.Load(Path("nothing"), "x"));
        Assert.Contains("train-images-idx3-ubyte", e.Message);
        Assert.Contains("not found", e.Message);
    }
}
