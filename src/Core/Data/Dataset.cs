using System.Runtime.Intrinsics;
using Backprop.Core.Numerics;
using System.Runtime.Intrinsics.X86;

namespace Backprop.Core.Data;

/// <summary>Labelled images kept as bytes (a quarter of the memory of floats); scaled to [0, 1] per batch.</summary>
public sealed class Dataset
{
    public Dataset(string name, int rows, int cols, byte[] pixels, byte[] labels, int classes)
    {
        if (rows < 1 || cols < 1 || (long)rows * cols > ResourceLimits.MaxLayerWidth)
            throw new ArgumentException($"{name}: {rows}x{cols} images do not fit a model's input of at most {ResourceLimits.MaxLayerWidth}");
        if (pixels.Length != (long)labels.Length * rows * cols)
            throw new ArgumentException($"{name}: {pixels.Length / Math.Max(1, rows * cols)} images but {labels.Length} labels");
        Name = name;
        Rows = rows;
        Cols = cols;
        _pixels = pixels;
        Labels = labels;
        Classes = classes;
    }

    /// <summary>A view of <paramref name="source"/> whose images are shifted (see <see cref="Shifted"/>).</summary>
    private Dataset(Dataset source, ulong shiftKey)
    {
        (Name, Rows, Cols, _pixels, Labels, Classes, _rows) = (source.Name, source.Rows, source.Cols, source._pixels, source.Labels, source.Classes, source._rows);
        (_shifted, _shiftKey) = (true, shiftKey);
    }

    /// <summary>A view of the samples of <paramref name="source"/> at <paramref name="samples"/> (see <see cref="Select"/>).</summary>
    private Dataset(Dataset source, int[] samples)
    {
        (Name, Rows, Cols, _pixels, Classes) = (source.Name, source.Rows, source.Cols, source._pixels, source.Classes);
        Labels = new byte[samples.Length];
        _rows = new int[samples.Length];
        for (int i = 0; i < samples.Length; i++)
        {
            if ((uint)samples[i] >= (uint)source.Count) throw new ArgumentOutOfRangeException(nameof(samples), $"sample {samples[i]} is outside {Name}'s {source.Count}");
            (Labels[i], _rows[i]) = (source.Labels[samples[i]], source.RowOf(samples[i]));
        }
    }

    /// <summary>The images, each Features bytes; of a view, those of the set it was made from.</summary>
    private readonly byte[] _pixels;
    private readonly bool _shifted;
    private readonly ulong _shiftKey;
    /// <summary>The image in <see cref="_pixels"/> of each sample of a <see cref="Select"/> view; null: sample i is image i.</summary>
    private readonly int[]? _rows;

    private int RowOf(int sample) => _rows is null ? sample : _rows[sample];

    /// <summary>
    /// The samples at <paramref name="samples"/>, in that order, as a set of their own: the labels copied, the images shared
    /// (a run's training and validation sets, cut once per run). Not of a shifted set: its shifts follow the sample index.
    /// </summary>
    public Dataset Select(int[] samples) => _shifted
        ? throw new InvalidOperationException($"{Name}: a shifted set is not cut further")
        : new Dataset(this, samples);

    /// <summary>
    /// The same samples, each image shifted by up to ±2 pixels in each direction (zeros shifted in), the shift drawn
    /// from (seed, epoch, sample index) alone: a chunk's inputs do not depend on who computes it, nor on when.
    /// </summary>
    public Dataset Shifted(long seed, int epoch) => new(this, Rng.For(seed, "shift", epoch).NextUInt64());

    /// <summary>The shift of sample <paramref name="index"/> under a shift key: each of dx, dy in -2..2.</summary>
    public static (int Dx, int Dy) ShiftOf(ulong key, int index)
    {
        ulong h = Rng.Hash(key, index);
        return ((int)(h % 5) - 2, (int)(h / 5 % 5) - 2);
    }

    public string Name { get; }
    public int Rows { get; }
    public int Cols { get; }
    public int Features => Rows * Cols;
    public int Count => Labels.Length;
    public int Classes { get; }
    /// <summary>
    /// The images, each Features bytes, sample i at i · Features. Not of a view (<see cref="Select"/>, <see cref="Shifted"/>):
    /// its array is the source's, whose images are others or unshifted, so what wrote or hashed it would get the wrong images.
    /// </summary>
    public byte[] Pixels => _rows is null && !_shifted
        ? _pixels
        : throw new InvalidOperationException($"{Name}: a view's images are those of the set it was made from; use that set");
    public byte[] Labels { get; }

    /// <summary>Writes the images at <paramref name="indices"/> as rows scaled to [0, 1].</summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    public unsafe void CopyInputs(ReadOnlySpan<int> indices, Span<float> rows)
    {
        int f = Features;
        if (rows.Length < (long)indices.Length * f) throw new ArgumentException("rows is too short", nameof(rows));
        foreach (int index in indices)
            if ((uint)index >= (uint)Count) throw new ArgumentOutOfRangeException(nameof(indices), $"sample {index} is outside {Name}'s {Count}");
        const float scale = 1f / 255f;
        if (_shifted)
        {
            CopyShifted(indices, rows, scale);
            return;
        }
        fixed (byte* pixels = _pixels)
        fixed (float* output = rows)
        {
            for (int r = 0; r < indices.Length; r++)
            {
                byte* src = pixels + (long)RowOf(indices[r]) * f;
                float* dst = output + r * f;
                int k = 0;
                // Same operation per element on every path (u8 → float, times 1/255), so results do not depend on the path.
                if (Avx512F.IsSupported)
                    for (; k + 16 <= f; k += 16)
                        (Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(src + k))) * scale).Store(dst + k);
                else if (Avx2.IsSupported)
                    for (; k + 8 <= f; k += 8)
                        (Avx.ConvertToVector256Single(Avx2.ConvertToVector256Int32(src + k)) * scale).Store(dst + k);
                for (; k < f; k++) dst[k] = src[k] * scale;
            }
        }
    }

    private void CopyShifted(ReadOnlySpan<int> indices, Span<float> rows, float scale)
    {
        int f = Features;
        for (int r = 0; r < indices.Length; r++)
        {
            var (dx, dy) = ShiftOf(_shiftKey, indices[r]);
            var src = _pixels.AsSpan(RowOf(indices[r]) * f, f);
            var dst = rows.Slice(r * f, f);
            for (int y = 0; y < Rows; y++)
            {
                int sy = y - dy;
                for (int x = 0; x < Cols; x++)
                {
                    int sx = x - dx;
                    // The same operation per element as the unshifted copy (u8 → float, times 1/255).
                    dst[y * Cols + x] = (uint)sy < (uint)Rows && (uint)sx < (uint)Cols ? src[sy * Cols + sx] * scale : 0f;
                }
            }
        }
    }

    /// <summary>Asks the CPU to start loading these samples' pixels: the rows of a random chunk are cache misses otherwise.</summary>
    public unsafe void Prefetch(ReadOnlySpan<int> indices)
    {
        if (!Sse.IsSupported) return;
        int f = Features;
        fixed (byte* pixels = _pixels)
        {
            foreach (int index in indices)
            {
                byte* row = pixels + (long)RowOf(index) * f;
                for (int k = 0; k < f; k += 64) Sse.Prefetch1(row + k);
            }
        }
    }

    public void CopyLabels(ReadOnlySpan<int> indices, Span<byte> labels)
    {
        for (int r = 0; r < indices.Length; r++) labels[r] = Labels[indices[r]];
    }

    /// <summary>The first <paramref name="count"/> samples (the seed's Nielsen run trains on the first 50,000).</summary>
    public Dataset Take(int count) => count >= Count ? this : Select([.. Enumerable.Range(0, count)]);
}

public sealed record TrainTest(Dataset Train, Dataset Test);
