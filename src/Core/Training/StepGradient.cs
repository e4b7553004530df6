using Backprop.Core.Data;
using Backprop.Core.Numerics;

namespace Backprop.Core.Training;

/// <summary>
/// The gradient sum of an aligned block of a step's chunks (see <see cref="ChunkBlocks"/>): each chunk in one
/// batched pass, reduced with the pairwise tree as its blocks come out of the backprop threads. This is the
/// step of <see cref="LocalTrainer"/> (one block: the whole step, its root applied by the optimizer in place)
/// and of every worker (its block, the root kept for the server), so the benchmarked code is the product's.
/// Allocates nothing per call.
/// </summary>
public sealed class StepGradient : IDisposable
{
    private readonly ChunkRunner _runner;
    private readonly PairwiseSum _sum;

    /// <param name="maxChunks">The most chunks of one block (at most a step's).</param>
    public StepGradient(Core.Model.ModelSpec model, int chunkSize, int maxChunks, int threads)
    {
        _runner = new ChunkRunner(model, chunkSize, threads);
        _sum = new PairwiseSum(_runner.ParameterCount, maxChunks);
    }

    public ChunkRunner Runner => _runner;
    public int ParameterCount => _runner.ParameterCount;
    public int MaxChunks => _sum.MaxLeaves;

    /// <summary>The block's gradient sum after <see cref="SumBlock"/>; valid until the next call.</summary>
    public ReadOnlyMemory<float> Result => _sum.Result;

    /// <summary>
    /// Σ over chunks [<paramref name="first"/>, <paramref name="end"/>) of step <paramref name="step"/> of each
    /// chunk's gradient sum, in the tree's order, into <see cref="Result"/>; returns the summed cost.
    /// <paramref name="nextStepChunk"/>: the chunk of the next step this caller will compute, to prefetch its samples.
    /// </summary>
    public double SumBlock(Dataset data, EpochPlan plan, int step, int first, int end, ReadOnlySpan<float> parameters, int nextStepChunk = -1,
        BlockProgress? progress = null)
    {
        _sum.Begin(Check(plan, step, first, end), written: progress?.OnWritten);
        if (progress is not null) progress.Sum = _sum.RootBuffer;
        double loss = 0;
        for (int c = first; c < end; c++)
        {
            var next = Next(plan, step, c, end, nextStepChunk);
            var target = _sum.NextLeaf();
            bool last = c == end - 1;
            if (last && progress is not null) progress.LossBefore = loss;
            loss += target.Buffer is { } buffer
                ? _runner.GradientSum(data, parameters, plan.Chunk(step, c), buffer, next)
                : _runner.GradientSum(data, parameters, plan.Chunk(step, c), target.Blocks!, next, last ? progress?.OnChunkLoss : null);
            _sum.Next();
        }
        return loss;
    }

    /// <summary>
    /// The whole step: its gradient sum goes to <paramref name="update"/> block by block as the last chunk finishes,
    /// and the callback may update <paramref name="parameters"/> in place (no weight is read after that point).
    /// </summary>
    public double SumStep(Dataset data, EpochPlan plan, int step, Span<float> parameters, GradientBlock update)
    {
        int chunks = plan.ChunkCount(step);
        _sum.Begin(Check(plan, step, 0, chunks), update);
        double loss = 0;
        for (int c = 0; c < chunks; c++)
        {
            var next = Next(plan, step, c, chunks, nextStepChunk: 0);
            var target = _sum.NextLeaf();
            loss += target.Buffer is { } buffer
                ? _runner.GradientSum(data, parameters, plan.Chunk(step, c), buffer, next)
                : c == chunks - 1
                    ? _runner.GradientSumAndUpdate(data, parameters, plan.Chunk(step, c), target.Blocks!, next)
                    : _runner.GradientSum(data, parameters, plan.Chunk(step, c), target.Blocks!, next);
            _sum.Next();
        }
        return loss;
    }

    private int Check(EpochPlan plan, int step, int first, int end)
    {
        if (step < 0 || step >= plan.Steps) throw new ArgumentOutOfRangeException(nameof(step), $"step {step} is outside 0..{plan.Steps - 1}");
        int chunks = plan.ChunkCount(step);
        if (first < 0 || end > chunks || first >= end)
            throw new ArgumentOutOfRangeException(nameof(first), $"chunks [{first}, {end}) are not within step {step}'s {chunks}");
        if (end - first > _sum.MaxLeaves) throw new ArgumentOutOfRangeException(nameof(end), $"{end - first} chunks, more than the {_sum.MaxLeaves} this was built for");
        return end - first;
    }

    /// <summary>The chunk after c: the next of the block, or the caller's chunk of the next step.</summary>
    private static ReadOnlySpan<int> Next(EpochPlan plan, int step, int c, int end, int nextStepChunk) =>
        c + 1 < end ? plan.Chunk(step, c + 1)
        : nextStepChunk >= 0 && step + 1 < plan.Steps && nextStepChunk < plan.ChunkCount(step + 1) ? plan.Chunk(step + 1, nextStepChunk)
        : default;

    public void Dispose() => _runner.Dispose();
}
