using System.Numerics.Tensors;

namespace Backprop.Core.Training;

/// <summary>
/// The one way chunk gradient sums are combined: in chunk order, left to right. Float addition is not
/// associative, so a fixed order is what makes the result independent of the number of workers.
/// </summary>
public static class GradientReduction
{
    public static void SumInChunkOrder(ReadOnlySpan<ReadOnlyMemory<float>> chunkSums, Span<float> total)
    {
        if (chunkSums.Length == 0) throw new ArgumentException("a step needs at least one chunk", nameof(chunkSums));
        foreach (var sum in chunkSums)
            if (sum.Length != total.Length) throw new ArgumentException($"a chunk sum has {sum.Length} entries, not {total.Length}", nameof(chunkSums));
        chunkSums[0].Span.CopyTo(total);
        for (int c = 1; c < chunkSums.Length; c++) TensorPrimitives.Add(total, chunkSums[c].Span, total);
    }
}
