using Backprop.Core.Data;
using Backprop.Core.Numerics;

namespace Backprop.Core.Training;

/// <summary>A step about to be computed: its place in the epoch, its version (global step index) and its sample count.</summary>
public readonly record struct StepStart(int Step, long Version, int Samples);

/// <summary>A block's gradient sum of one step, computed: its cost summed over the block's samples and the time it took.</summary>
public readonly record struct StepBlock(int Step, long Version, int Samples, double Loss, ReadOnlyMemory<float> Sum, double ComputeSeconds);

/// <summary>
/// Where a <see cref="StepLoop"/> gets each step's parameters and takes each step's block sum: a cluster worker pulls
/// from and pushes to the parameter-server shards; <see cref="LocalTrainer"/> holds the parameters and steps them itself.
/// </summary>
public interface IStepTarget
{
    /// <summary>The parameters of version <see cref="StepStart.Version"/>, to compute the step on (a worker pulls them when it does not hold them).</summary>
    ValueTask<float[]> Begin(StepStart step);

    /// <summary>
    /// For a target that computes whole steps and applies them in place: the update the step's last chunk calls with its
    /// sum block by block (see <see cref="StepGradient.SumStep"/>); <see cref="Apply"/> then gets an empty sum. Null: the sum
    /// is finished first.
    /// </summary>
    GradientBlock? FusedUpdate { get; }

    /// <summary>For a target that sends a block's sum as it is computed: told what of it is final (null: nothing, the sum is taken whole).</summary>
    BlockProgress? Progress => null;

    /// <summary>Applies the step with this block (or hands the block to who does); false: stop the loop after this step.</summary>
    ValueTask<bool> Apply(StepBlock block);
}

/// <summary>
/// The step loop that <see cref="LocalTrainer"/> and every cluster worker run: for each step of a window, the
/// parameters of its version, the gradient sum of the caller's aligned block of the step's chunks (the whole step for
/// one process), and the step applied through the target. So the cluster computes what the single process computes,
/// in the same order, by the same code. Allocates nothing when the target's calls complete synchronously.
/// </summary>
public static class StepLoop
{
    /// <summary>
    /// Steps [<paramref name="firstStep"/>, +<paramref name="steps"/>) of <paramref name="plan"/>'s epoch, the first of
    /// version <paramref name="firstVersion"/>; of each, the chunks [First, End) of <paramref name="block"/>, or all of
    /// them when it is null. Returns the steps applied (fewer when the target stops the loop).
    /// </summary>
    public static async ValueTask<int> Run(StepGradient gradient, Dataset input, EpochPlan plan, int firstStep, int steps, long firstVersion,
        (int First, int End)? block, IStepTarget target)
    {
        for (int k = 0; k < steps; k++)
        {
            int step = firstStep + k;
            var start = new StepStart(step, firstVersion + k, plan.StepSize(step));
            var parameters = await target.Begin(start);
            long computing = System.Diagnostics.Stopwatch.GetTimestamp();
            var (first, end) = block ?? (0, plan.ChunkCount(step));
            bool whole = first == 0 && end == plan.ChunkCount(step);
            // The same block of the next step is this caller's too while the cut stays: its samples are fetched meanwhile.
            double loss = whole && target.FusedUpdate is { } update
                ? gradient.SumStep(input, plan, step, parameters, update)
                : gradient.SumBlock(input, plan, step, first, end, parameters, nextStepChunk: first, target.Progress);
            var sum = whole && target.FusedUpdate is not null ? ReadOnlyMemory<float>.Empty : gradient.Result;
            double seconds = System.Diagnostics.Stopwatch.GetElapsedTime(computing).TotalSeconds;
            if (!await target.Apply(new StepBlock(step, start.Version, start.Samples, loss, sum, seconds))) return k;
        }
        return steps;
    }
}
