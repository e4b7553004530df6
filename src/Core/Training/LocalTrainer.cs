using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;

namespace Backprop.Core.Training;

/// <summary>
/// The sync step in one process, without Orleans: the same plan, chunk sums, reduction order and
/// optimizer as the cluster. The cluster's parameters must equal these bit for bit.
/// </summary>
public sealed class LocalTrainer
{
    private readonly RunSpec _spec;
    private readonly Dataset _train;
    private readonly ChunkRunner _runner;
    private readonly float[][] _chunkSums;
    private readonly float[] _total;
    private readonly float[] _velocity;

    public LocalTrainer(RunSpec spec, Dataset train)
    {
        _spec = spec;
        _train = train.Take(spec.TrainCount(train.Count));
        _runner = new ChunkRunner(spec.Model, spec.ChunkSize);
        Parameters = Initializer.Create(spec.Model, spec.Init, spec.Seed);
        int chunksPerStep = (spec.BatchSize + spec.ChunkSize - 1) / spec.ChunkSize;
        _chunkSums = Enumerable.Range(0, chunksPerStep).Select(_ => new float[Parameters.Length]).ToArray();
        _total = new float[Parameters.Length];
        _velocity = new float[Parameters.Length];
    }

    public float[] Parameters { get; }

    /// <summary>Trains one epoch, or its first <paramref name="maxSteps"/> steps; returns the mean training cost.</summary>
    public double TrainEpoch(int epoch, int maxSteps = int.MaxValue)
    {
        var plan = new EpochPlan(_train.Count, _spec.BatchSize, _spec.ChunkSize, _spec.Seed, epoch);
        double loss = 0;
        int samples = 0;
        for (int step = 0; step < Math.Min(plan.Steps, maxSteps); step++)
        {
            int chunks = plan.ChunkCount(step);
            var sums = new ReadOnlyMemory<float>[chunks];
            for (int c = 0; c < chunks; c++)
            {
                loss += _runner.GradientSum(_train, Parameters, plan.Chunk(step, c), _chunkSums[c]);
                sums[c] = _chunkSums[c];
            }
            GradientReduction.SumInChunkOrder(sums, _total);
            Optimizer.Step(_spec.Optimizer, Parameters, _total, plan.StepSize(step), _velocity);
            samples += plan.StepSize(step);
        }
        return loss / samples;
    }
}
