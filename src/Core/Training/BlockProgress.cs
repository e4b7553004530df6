namespace Backprop.Core.Training;

/// <summary>
/// What of a block's gradient sum is final while <see cref="StepGradient.SumBlock"/> computes it: the block's cost once
/// the last chunk's forward pass is done, then the ranges of the sum as the backprop threads write them. A worker sends
/// the parts that are done while the rest is computed (the sum's values and their order are the same either way).
/// </summary>
public abstract class BlockProgress
{
    protected BlockProgress()
    {
        // Made once: a method group or lambda converted on every step would allocate.
        OnWritten = Written;
        OnChunkLoss = chunkLoss => LossKnown(LossBefore + chunkLoss);
    }

    /// <summary>The buffer the block's sum is built in (valid until the next sum); a range of it is final once <see cref="Written"/> said so.</summary>
    protected internal ReadOnlyMemory<float> Sum { get; internal set; }

    /// <summary>The cost of the block's chunks before its last: the last chunk's is added to it as SumBlock adds it.</summary>
    internal double LossBefore { get; set; }
    internal PairwiseSum.RangeWritten OnWritten { get; }
    internal Action<double> OnChunkLoss { get; }

    /// <summary>The block's summed cost, the value SumBlock returns; on the calling thread, before any range is written.</summary>
    protected abstract void LossKnown(double loss);

    /// <summary>Entries [start, start + length) of <see cref="Sum"/> are final; from a backprop thread, at once for disjoint ranges.</summary>
    protected abstract void Written(int start, int length);
}
