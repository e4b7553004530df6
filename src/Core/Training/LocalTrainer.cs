using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;

namespace Backprop.Core.Training;

/// <summary>
/// The sync step in one process, without Orleans: the same plan, chunk sums, reduction order and
/// optimizer as the cluster. The cluster's parameters must equal these bit for bit. Allocates nothing
/// per step once constructed.
/// </summary>
public sealed class LocalTrainer : IDisposable
{
    private readonly RunSpec _spec;
    private readonly Dataset _train;
    private readonly ChunkRunner _runner;
    private readonly float[][] _chunkSums;
    private readonly ReadOnlyMemory<float>[] _chunkViews;
    private readonly float[] _total;
    private readonly float[] _velocity;
    private readonly Action<int, int> _stepRange;
    private readonly GradientBlock _stepBlock;
    private readonly EpochPlan _plan;
    private int _stepCount;

    public LocalTrainer(RunSpec spec, Dataset train, int threads = 1)
    {
        // Also bounds the chunk sums below: a step's sums must fit one message, which is more than they take here.
        spec.Validate(threads);
        _spec = spec;
        _train = train.Take(spec.TrainCount(train.Count));
        _runner = new ChunkRunner(spec.Model, spec.ChunkSize, threads);
        Parameters = Initializer.Create(spec.Model, spec.Init, spec.Seed);
        int chunksPerStep = (spec.BatchSize + spec.ChunkSize - 1) / spec.ChunkSize;
        // One-chunk steps never hold a whole gradient (see TrainEpoch): the sums exist for several chunks only.
        int sums = chunksPerStep > 1 ? chunksPerStep : 0;
        _chunkSums = Enumerable.Range(0, sums).Select(_ => new float[Parameters.Length]).ToArray();
        _chunkViews = _chunkSums.Select(c => (ReadOnlyMemory<float>)c).ToArray();
        _total = sums > 0 ? new float[Parameters.Length] : [];
        _velocity = new float[Parameters.Length];
        _plan = new EpochPlan(_train.Count, spec.BatchSize, spec.ChunkSize, spec.Seed, epoch: 0);
        // The step is element-wise: each thread updates the part of the vector whose gradient it just wrote.
        _stepRange = (from, to) => Optimizer.Step(_spec.Optimizer, Parameters.AsSpan(from, to - from),
            _total.AsSpan(from, to - from), _stepCount, _velocity.AsSpan(from, to - from));
        _stepBlock = (start, gradient) => Optimizer.Step(_spec.Optimizer, Parameters.AsSpan(start, gradient.Length),
            gradient, _stepCount, _velocity.AsSpan(start, gradient.Length));
    }

    public float[] Parameters { get; }

    /// <summary>Trains one epoch, or its first <paramref name="maxSteps"/> steps; returns the mean training cost.</summary>
    public double TrainEpoch(int epoch, int maxSteps = int.MaxValue)
    {
        var plan = _plan;
        if (plan.Epoch != epoch) plan.MoveTo(epoch);
        double loss = 0;
        int samples = 0;
        for (int step = 0; step < Math.Min(plan.Steps, maxSteps); step++)
        {
            int chunks = plan.ChunkCount(step);
            _stepCount = plan.StepSize(step);
            for (int c = 0; c < chunks; c++)
            {
                var next = c + 1 < chunks ? plan.Chunk(step, c + 1) : step + 1 < plan.Steps ? plan.Chunk(step + 1, 0) : default;
                // A one-chunk step is its own sum: its optimizer update runs on each gradient block as it is finished.
                loss += chunks == 1
                    ? _runner.GradientSum(_train, Parameters, plan.Chunk(step, c), _stepBlock, next)
                    : _runner.GradientSum(_train, Parameters, plan.Chunk(step, c), _chunkSums[c], next);
            }
            if (chunks > 1)
            {
                GradientReduction.SumInChunkOrder(_chunkViews.AsSpan(0, chunks), _total);
                _runner.Parallel.Run(Parameters.Length, _stepRange, align: 64);
            }
            samples += plan.StepSize(step);
        }
        return loss / samples;
    }

    public void Dispose() => _runner.Dispose();
}
