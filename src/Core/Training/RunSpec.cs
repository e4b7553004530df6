using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;

namespace Backprop.Core.Training;

/// <summary>
/// Everything that determines a run's trained parameters (with the data). Worker and server-shard counts are
/// here too but never change the result: the step reduces fixed-size chunks in chunk order, and the optimizer
/// is element-wise.
/// </summary>
public sealed record RunSpec(
    ModelSpec Model,
    InitScheme Init,
    OptimizerSettings Optimizer,
    int BatchSize,
    int ChunkSize,
    int Epochs,
    int Workers,
    long Seed,
    string Dataset,
    int TrainLimit,
    int CheckpointEvery = RunSpec.DefaultCheckpointEvery,
    int ServerShards = 1,
    int StepsPerEpoch = 0,
    int Validation = 0,
    int EarlyStop = 0,
    bool KeepBest = false,
    string Augment = RunSpec.NoAugment,
    double ClipNorm = 0,
    bool ValidationLast = false)
{
    public const string NoAugment = "none";
    /// <summary>Training images shifted by up to ±2 pixels, drawn from (seed, epoch, sample index); see <see cref="Data.Dataset.Shifted"/>.</summary>
    public const string Shift2 = "shift2";

    public const int MaxWorkers = 256;
    /// <summary>Steps between checkpoints of the parameter server (every epoch end is one too); see README for the cost.</summary>
    public const int DefaultCheckpointEvery = 100;

    /// <summary>
    /// Throws <see cref="ArgumentException"/> naming the first bad setting, or a size over
    /// <see cref="ResourceLimits"/> (checked for one thread per worker; see <see cref="Validate(int)"/>).
    /// </summary>
    public void Validate()
    {
        Model.Validate();
        Optimizer.Validate();
        if (StepsPerEpoch < 0) throw new ArgumentException($"steps-per-epoch: {StepsPerEpoch} is negative");
        Optimizer.ValidateLength(Epochs, StepsPerEpoch);
        if (BatchSize < 1 || BatchSize > ResourceLimits.MaxBatchSize)
            throw new ArgumentException($"batch-size: {BatchSize} is outside 1..{ResourceLimits.MaxBatchSize}");
        if (ChunkSize < 1 || ChunkSize > Math.Min(BatchSize, ResourceLimits.MaxChunkSize))
            throw new ArgumentException($"chunk-size: {ChunkSize} is outside 1..{Math.Min(BatchSize, ResourceLimits.MaxChunkSize)} (the batch size, at most {ResourceLimits.MaxChunkSize})");
        if (Epochs < 1 || Epochs > 100_000) throw new ArgumentException($"epochs: {Epochs} is outside 1..100000");
        if (Workers < 1 || Workers > MaxWorkers) throw new ArgumentException($"workers: {Workers} is outside 1..{MaxWorkers}");
        if (TrainLimit < 0) throw new ArgumentException($"train-limit: {TrainLimit} is negative");
        if (CheckpointEvery < 1 || CheckpointEvery > 1_000_000) throw new ArgumentException($"checkpoint-every: {CheckpointEvery} is outside 1..1000000");
        DatasetCatalog.Validate(Dataset);
        if (Validation < 0) throw new ArgumentException($"validation: {Validation} is negative");
        if (EarlyStop < 0) throw new ArgumentException($"early-stop: patience {EarlyStop} is negative");
        if (EarlyStop > 0 && Validation == 0) throw new ArgumentException("early-stop: needs --validation (the test set is never used for a decision)");
        if (Augment is not (NoAugment or Shift2)) throw new ArgumentException($"augment: '{Augment}' is not one of {NoAugment}, {Shift2}");
        if (KeepBest && Validation == 0) throw new ArgumentException("keep: best needs --validation (the test set is never used for a decision)");
        if (!(ClipNorm >= 0) || double.IsInfinity(ClipNorm)) throw new ArgumentException($"clip-norm: {ClipNorm} is not a non-negative finite number (0: no clipping)");
        if (!Enum.IsDefined(Init)) throw new ArgumentException($"init: {(int)Init} is not a known scheme");
        Shards.Validate();
        // No bound on chunks × parameters: a worker reduces its block's chunk sums before it sends anything (one vector,
        // cut by shard), holding at most ⌈log2 chunks⌉ ≤ 20 partial sums (PairwiseSum), 1.25 GiB at the largest model.
        BatchBackprop.BufferBytes(Model, ChunkSize, threads: 1);
        WorkBounds.Check(this);
    }

    /// <summary>
    /// <see cref="Validate()"/>, and the limits that depend on the threads each worker runs: the threads of
    /// all workers together, and each worker's backprop buffers.
    /// </summary>
    public void Validate(int threadsPerWorker)
    {
        Validate();
        if (threadsPerWorker < 1 || threadsPerWorker > ResourceLimits.MaxThreadsPerWorker)
            throw new ArgumentException($"threads-per-worker: {threadsPerWorker} is outside 1..{ResourceLimits.MaxThreadsPerWorker}");
        if ((long)Workers * threadsPerWorker > ResourceLimits.MaxTotalThreads)
            throw new ArgumentException($"workers {Workers} x threads-per-worker {threadsPerWorker} = {(long)Workers * threadsPerWorker} threads, over the limit of {ResourceLimits.MaxTotalThreads}");
        BatchBackprop.BufferBytes(Model, ChunkSize, threadsPerWorker);
    }

    /// <summary>Checks the spec against the data it will train on.</summary>
    public void ValidateAgainst(Dataset train)
    {
        if (Augment == Shift2 && (train.Rows < 3 || train.Cols < 3))
            throw new ArgumentException($"augment: shift2 needs images of at least 3x3 pixels; {Dataset} has {train.Rows}x{train.Cols}");
        if (Validation >= train.Count)
            throw new ArgumentException($"validation: {Validation} held-out images leave none of the {train.Count} training images of {Dataset} to train on");
        if (Model.InputSize != train.Features)
            throw new ArgumentException($"layers: input size {Model.InputSize} does not match the {train.Rows}x{train.Cols} = {train.Features} pixels of {Dataset}");
        if (Model.OutputSize != train.Classes)
            throw new ArgumentException($"layers: output size {Model.OutputSize} does not match the {train.Classes} classes of {Dataset}");
    }

    /// <summary>
    /// The spec as a run on <paramref name="trainCount"/> training samples stores it: with <see cref="StepsPerEpoch"/>
    /// filled in where the learning-rate schedule depends on the run's length, so that the shards, which hold no data,
    /// step with the same rates. Refuses a schedule that needs more steps than the run has.
    /// </summary>
    public RunSpec Resolve(int trainCount)
    {
        int steps = (int)((trainCount + (long)BatchSize - 1) / BatchSize);
        if (StepsPerEpoch != 0 && StepsPerEpoch != steps)
            throw new ArgumentException($"steps-per-epoch: {StepsPerEpoch} is not the {steps} steps of {trainCount} training samples at batch size {BatchSize}");
        if (!Optimizer.NeedsRunLength) return this;
        var resolved = this with { StepsPerEpoch = steps };
        resolved.Optimizer.ValidateLength(Epochs, steps);
        return resolved;
    }

    /// <summary>The optimizer that steps this run (its schedule needs <see cref="Resolve"/> first where it depends on the run's length).</summary>
    public Optimizer CreateOptimizer() => Numerics.Optimizer.For(Optimizer, Epochs, StepsPerEpoch);

    /// <summary>The learning rate of the first step of epoch <paramref name="epoch"/> (1-based), as the run's optimizer uses it.</summary>
    public double EpochLearningRate(int epoch) =>
        new LearningRateSchedule(Optimizer, Epochs, StepsPerEpoch).At((long)(epoch - 1) * StepsPerEpoch);

    /// <summary>The cut of the parameters over the server's shards: on norm tiles when the gradient is clipped (see <see cref="GradientClip"/>).</summary>
    public ShardLayout Shards => new((int)Model.ParameterCount, ServerShards, ClipNorm > 0 ? GradientClip.Tile : ShardLayout.CacheLine);

    /// <summary>Chunks of a full step (the last step of an epoch may have fewer).</summary>
    public int ChunksPerStep => (int)((BatchSize + (long)ChunkSize - 1) / ChunkSize);

    /// <summary>How many images a run trains on: those not held out (see <see cref="Split"/>), up to the train limit.</summary>
    public int TrainCount(int available) => TrainLimit == 0 ? available - Validation : Math.Min(TrainLimit, available - Validation);

    /// <summary>
    /// The run's training and validation sets, cut from the <paramref name="available"/> training images: <see cref="Validation"/>
    /// held out (<see cref="HeldOut"/>), the others in their original order up to the train limit (<see cref="TrainCount"/>).
    /// The one cut that the local trainer and every worker use. <see cref="ValidationLast"/>: a run stored by a version before
    /// the seeded draw held out the last images, and resumes on that split.
    /// </summary>
    public (Dataset Train, Dataset Validation) Split(Dataset available)
    {
        if (Validation >= available.Count)
            throw new ArgumentException($"validation: {Validation} held-out images leave none of the {available.Count} training images of {Dataset} to train on");
        int[] held = Validation == 0 ? []
            : ValidationLast ? Enumerable.Range(available.Count - Validation, Validation).ToArray()
            : HeldOut(Seed, available.Count, Validation);
        var rest = new int[TrainCount(available.Count)];
        for (int i = 0, h = 0, r = 0; r < rest.Length; i++)
        {
            if (h < held.Length && held[h] == i) h++;
            else rest[r++] = i;
        }
        return (available.Select(rest), available.Select(held));
    }

    /// <summary>
    /// The validation images of a run: <paramref name="count"/> of the <paramref name="available"/> training images, the
    /// first places of a permutation drawn from the run's seed (a partial Fisher–Yates), ascending. Fixed by
    /// (seed, available, count) alone, so every silo and every resume holds out the same images.
    /// </summary>
    public static int[] HeldOut(long seed, int available, int count)
    {
        var order = new int[available];
        for (int i = 0; i < available; i++) order[i] = i;
        var rng = Rng.For(seed, "validation");
        for (int i = 0; i < count; i++)
        {
            int j = i + rng.NextInt(available - i);
            (order[i], order[j]) = (order[j], order[i]);
        }
        var held = order[..count];
        Array.Sort(held);
        return held;
    }

    /// <summary>What epoch <paramref name="epoch"/> trains on: the training images, shifted with --augment shift2 (never the validation or test images).</summary>
    public Dataset TrainingInput(Dataset train, int epoch) => Augment == Shift2 ? train.Shifted(Seed, epoch) : train;

    /// <summary>The spec with its input and output layers fitted to the data (a user's folder may have any image size and class count).</summary>
    public RunSpec FittedTo(Dataset train)
    {
        int[] layers = [.. Model.Layers];
        (layers[0], layers[^1]) = (train.Features, train.Classes);
        return this with { Model = Model with { Layers = layers } };
    }

    /// <summary>The default chunk size cuts a batch into 4 chunks, so up to 4 workers share each step (more when a quarter is over the chunk limit).</summary>
    public static int DefaultChunkSize(int batchSize) => Math.Clamp((int)((batchSize + 3L) / 4), 1, ResourceLimits.MaxChunkSize);
}

public static class Presets
{
    /// <summary>The seed's network.py run: [784,30,10] sigmoid, quadratic cost, N(0,1), batch 10, eta 3.0, first 50,000 images.</summary>
    public static RunSpec Nielsen => new(
        new ModelSpec([784, 30, 10], Activation.Sigmoid, Loss.Quadratic),
        InitScheme.Normal,
        new OptimizerSettings(OptimizerKind.Sgd, 3.0, 0f),
        BatchSize: 10, ChunkSize: 5, Epochs: 5, Workers: 2, Seed: 1, Dataset: "mnist", TrainLimit: 50_000);

    /// <summary>The seed's PyTorch run: 784-128-64-10 ReLU, softmax cross-entropy, SGD lr 0.01 momentum 0.9, batch 64.</summary>
    public static RunSpec PyTorchMlp => new(
        new ModelSpec([784, 128, 64, 10], Activation.Relu, Loss.CrossEntropy),
        InitScheme.PyTorch,
        new OptimizerSettings(OptimizerKind.Momentum, 0.01, 0.9f),
        BatchSize: 64, ChunkSize: 16, Epochs: 5, Workers: 4, Seed: 1, Dataset: "mnist", TrainLimit: 0);

    /// <summary>
    /// 98% on MNIST fast: 784-256-10 ReLU, AdamW lr 0.004 with decoupled weight decay 0.01 on PyTorch's one-cycle schedule,
    /// batch 128, training images shifted by up to ±2 px, 6 epochs, 2 workers (one a core of the 2-core machine it was
    /// tuned on). The fewest flops to 98% of the recipes tried, which is what beats libtorch's time on the same machine;
    /// Fashion-MNIST wants the wider, longer, unshifted run in README.
    /// </summary>
    public static RunSpec Fast98 => new(
        new ModelSpec([784, 256, 10], Activation.Relu, Loss.CrossEntropy),
        InitScheme.PyTorch,
        new OptimizerSettings(OptimizerKind.AdamW, 0.004, 0f, WeightDecay: 0.01, Schedule: ScheduleKind.OneCycle),
        BatchSize: 128, ChunkSize: 32, Epochs: 6, Workers: 2, Seed: 1, Dataset: "mnist", TrainLimit: 0, Augment: RunSpec.Shift2);

    public static readonly IReadOnlyList<string> Names = ["nielsen", "pytorch-mlp", "fast-98"];

    public static RunSpec Get(string name) => name switch
    {
        "nielsen" => Nielsen,
        "pytorch-mlp" => PyTorchMlp,
        "fast-98" => Fast98,
        _ => throw new ArgumentException($"preset: unknown '{name}' (known: {string.Join(", ", Names)})"),
    };
}
