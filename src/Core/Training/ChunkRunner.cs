using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;

namespace Backprop.Core.Training;

/// <summary>Gradient sums and evaluation of chunks of a dataset, with buffers reused across calls.</summary>
public sealed class ChunkRunner : IDisposable
{
    private readonly BatchBackprop _backprop;
    private readonly byte[] _labels;
    private readonly int[] _indices;

    public ChunkRunner(ModelSpec spec, int maxChunk, int threads = 1)
    {
        _backprop = new BatchBackprop(spec, maxChunk, threads);
        _labels = new byte[maxChunk];
        _indices = new int[maxChunk];
    }

    public ModelSpec Spec => _backprop.Spec;
    /// <summary>The threads of this runner, for other row-parallel work on the same data (the optimizer step).</summary>
    public RowParallel Parallel => _backprop.Parallel;
    public int MaxChunk => _backprop.MaxBatch;
    public int ParameterCount => _backprop.Layout.Length;

    /// <summary>
    /// Σ ∂C/∂θ over the samples at <paramref name="indices"/>, written to <paramref name="gradient"/>; returns Σ C.
    /// <paramref name="next"/> names the chunk that comes next, to be fetched into cache meanwhile.
    /// </summary>
    public double GradientSum(Dataset data, ReadOnlySpan<float> parameters, ReadOnlySpan<int> indices, Span<float> gradient, ReadOnlySpan<int> next = default) =>
        _backprop.GradientSum(parameters, Load(data, indices, next), _labels.AsSpan(0, indices.Length), gradient);

    /// <summary>The same sum, given block by block to <paramref name="ready"/> (see <see cref="BatchBackprop"/>); the cost to <paramref name="lossKnown"/> first.</summary>
    public double GradientSum(Dataset data, ReadOnlySpan<float> parameters, ReadOnlySpan<int> indices, GradientBlock ready, ReadOnlySpan<int> next = default,
        Action<double>? lossKnown = null) =>
        _backprop.GradientSum(parameters, Load(data, indices, next), _labels.AsSpan(0, indices.Length), ready, lossKnown);

    /// <summary>The same blocks, to a callback that updates <paramref name="parameters"/> in place (a step's last chunk).</summary>
    public double GradientSumAndUpdate(Dataset data, Span<float> parameters, ReadOnlySpan<int> indices, GradientBlock update, ReadOnlySpan<int> next = default) =>
        _backprop.GradientSumAndUpdate(parameters, Load(data, indices, next), _labels.AsSpan(0, indices.Length), update);

    private int Load(Dataset data, ReadOnlySpan<int> indices, ReadOnlySpan<int> next)
    {
        _backprop.LoadInputs(data, indices, next);
        data.CopyLabels(indices, _labels);
        return indices.Length;
    }

    /// <summary>Accuracy, cost and confusion counts over samples [start, end) of <paramref name="data"/>.</summary>
    public Evaluation Evaluate(Dataset data, ReadOnlySpan<float> parameters, int start, int end)
    {
        var result = Evaluation.Empty(Spec.OutputSize);
        for (int from = start; from < end; from += MaxChunk)
        {
            int n = Math.Min(MaxChunk, end - from);
            for (int i = 0; i < n; i++) _indices[i] = from + i;
            var idx = _indices.AsSpan(0, n);
            _backprop.LoadInputs(data, idx);
            data.CopyLabels(idx, _labels);
            double loss = _backprop.Forward(parameters, n, _labels.AsSpan(0, n));
            int correct = 0;
            for (int i = 0; i < n; i++)
            {
                int predicted = _backprop.Predict(i);
                result.Confusion[_labels[i] * Spec.OutputSize + predicted]++;
                if (predicted == _labels[i]) correct++;
            }
            result = result with { Count = result.Count + n, Correct = result.Correct + correct, LossSum = result.LossSum + loss };
        }
        return result;
    }

    public void Dispose() => _backprop.Dispose();
}
