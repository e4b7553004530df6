using System.CommandLine;
using System.Globalization;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Hosting;
using Microsoft.Extensions.DependencyInjection;

namespace Backprop.Client;

public static class TrainCommand
{
    private static readonly Option<string> Preset = Choice("--preset", "Starting configuration; other flags override it", Presets.Names, "pytorch-mlp");
    private static readonly Option<string?> Layers = new("--layers") { Description = "Layer sizes from input to output, e.g. 784,30,10" };
    private static readonly Option<string?> ActivationOpt = Choice("--activation", "Hidden activation", ["sigmoid", "tanh", "relu"]);
    private static readonly Option<string?> LossOpt = Choice("--loss", "Output and cost: quadratic (sigmoid outputs) or cross-entropy (softmax)", ["quadratic", "cross-entropy"]);
    private static readonly Option<string?> InitOpt = Choice("--init", "Weight initialisation", ["normal", "pytorch", "he", "xavier"]);
    private static readonly Option<string?> OptimizerOpt = Choice("--optimizer", "Optimizer, as torch.optim writes it: sgd, momentum, nesterov (SGD with Nesterov momentum), adam, adamw (decoupled weight decay)", ["sgd", "momentum", "nesterov", "adam", "adamw"]);
    private static readonly Option<double?> Lr = new("--lr") { Description = "Learning rate (eta), a double as PyTorch's; the peak rate of a schedule" };
    private static readonly Option<float?> MomentumOpt = new("--momentum") { Description = "Momentum (PyTorch's formulation); implies --optimizer momentum when > 0 (nesterov: default 0.9)" };
    private static readonly Option<double?> WeightDecay = new("--weight-decay") { Description = "Weight decay: L2 added to the gradient (sgd, momentum, nesterov, adam), decoupled for adamw [default: 0]" };
    private static readonly Option<double?> Beta1 = new("--beta1") { Description = "Adam's beta1, in [0, 1) [default: 0.9]" };
    private static readonly Option<double?> Beta2 = new("--beta2") { Description = "Adam's beta2, in [0, 1) [default: 0.999]" };
    private static readonly Option<double?> Eps = new("--eps") { Description = "Adam's eps, added to the root of the second moment [default: 1e-8]" };
    private static readonly Option<string?> Schedule = Choice("--lr-schedule", "Learning-rate schedule over the run's steps: constant, step (x --lr-gamma every --lr-step-epochs), cosine (to --lr-min at the last step), one-cycle (PyTorch's OneCycleLR: from lr/25 up to --lr over the warm-up, pct_start = warm-up / steps, then down to --lr-min)", ["constant", "step", "cosine", "one-cycle"]);
    private static readonly Option<int?> LrStepEpochs = new("--lr-step-epochs") { Description = "Step schedule: multiply the rate by --lr-gamma every N epochs; implies --lr-schedule step" };
    private static readonly Option<double?> LrGamma = new("--lr-gamma") { Description = "Step schedule: the factor applied every --lr-step-epochs [default: 0.1]" };
    private static readonly Option<double?> LrMin = new("--lr-min") { Description = "Cosine and one-cycle: the rate at the last step [default: cosine 0, one-cycle lr/25/1e4 as PyTorch's OneCycleLR]" };
    private static readonly Option<int?> WarmupSteps = new("--warmup-steps") { Description = "Linear warm-up over the first N steps (any schedule; one-cycle: its rising phase, default 30% of the run) [default: 0]" };
    private static readonly Option<double?> ClipNorm = new("--clip-norm")
    {
        Description = "Clip the step's mean gradient to this global 2-norm, as torch.nn.utils.clip_grad_norm_ (the same bits for any worker or shard count; slices of the server are then cut on 1024-float tiles) [default: 0, none]",
    };
    private static readonly Option<int?> BatchSize = new("--batch-size") { Description = "Global batch size B (independent of the worker count)" };
    private static readonly Option<int?> ChunkSize = new("--chunk-size") { Description = "Samples per chunk, the unit of work and reduction [default: B/4 rounded up]" };
    private static readonly Option<int?> Epochs = new("--epochs") { Description = "Epochs to train" };
    private static readonly Option<int?> Workers = new("--workers") { Description = "Worker grains (spread over the worker silos); default: the preset's on the embedded silo, one per worker silo on a cluster" };
    private static readonly Option<long?> Seed = new("--seed") { Description = "Seed of initialisation and sample order" };
    private static readonly Option<int?> TrainLimit = new("--train-limit") { Description = "Train on the first N training images only (0 = all)" };
    private static readonly Option<string> Dataset = Cli.Dataset();
    private static readonly Option<string> DataDir = Cli.DataDir();
    private static readonly ClusterAddressOptions Address = new("Run on a running cluster through these gateways instead of an embedded silo");
    private static readonly Option<int?> Validation = new("--validation")
    {
        Description = "Hold out N training images drawn from the seed (fixed for the run, never trained on) and report validation loss and accuracy after every epoch [default: 0, none]",
    };
    private static readonly Option<int?> EarlyStop = new("--early-stop")
    {
        Description = "Stop (completed) once validation accuracy has not improved for this many epochs; needs --validation [default: 0, never]",
    };
    private static readonly Option<string?> Augment = Choice("--augment",
        "Training images shifted by up to ±2 pixels each epoch, drawn from (seed, epoch, sample index): none or shift2 [default: none]",
        [RunSpec.NoAugment, RunSpec.Shift2]);
    private static readonly Option<string?> Keep = Choice("--keep",
        "Parameters the run keeps for --model-out: last (the last epoch's) or best (the epoch with the best validation accuracy; needs --validation) [default: last]",
        ["best", "last"]);
    private static readonly FollowOptions Follow = new();
    private static readonly Option<int?> ThreadsPerWorker = new("--threads-per-worker")
    {
        Description = "Embedded cluster only: threads each worker uses for a chunk [default: cores / workers, at least 1]",
    };
    private static readonly Option<string?> RunId = new("--run-id") { Description = "Run id [default: run-<time>-<random>]" };
    private static readonly Option<int?> CheckpointEvery = new("--checkpoint-every")
    {
        Description = $"Steps between checkpoints of the parameters (and at every epoch end); a lost parameter server redoes at most this many steps [default: {RunSpec.DefaultCheckpointEvery}]",
    };

    private static readonly Option<int?> ServerShards = new("--server-shards")
    {
        Description = "Parameter-server shards S: the parameter vector cut into S slices, each a grain spread over the silos beside the workers; results do not depend on it [default: one per worker silo on a cluster; embedded: min(cores, workers)]",
    };

    private static readonly Option<int?> HttpPort = new("--http-port")
    {
        Description = "Embedded silo: serve the run page (/), /metrics, /api and the Orleans Dashboard (/dashboard) on 127.0.0.1 at this port while the run goes (on a cluster each silo serves its own: silo --http-port)",
    };

    public static Command Create()
    {
        var command = new Command("train", "Train a network and report test accuracy after every epoch")
        {
            Preset, Layers, ActivationOpt, LossOpt, InitOpt, OptimizerOpt, Lr, MomentumOpt, WeightDecay, Beta1, Beta2, Eps,
            Schedule, LrStepEpochs, LrGamma, LrMin, WarmupSteps, ClipNorm, BatchSize, ChunkSize, Epochs, Workers, Seed,
            TrainLimit, Dataset, DataDir, RunId, ThreadsPerWorker, CheckpointEvery, ServerShards, HttpPort,
            Validation, EarlyStop, Keep, Augment,
        };
        Address.AddTo(command);
        Follow.AddTo(command);
        command.SetAction((parse, cancel) => Cli.Guard(() => Run(parse, cancel)));
        return command;
    }

    /// <summary>The preset with every given flag applied, validated.</summary>
    public static RunSpec BuildSpec(ParseResult parse)
    {
        var spec = Presets.Get(parse.GetValue(Preset)!);
        var model = spec.Model;
        if (parse.GetValue(Layers) is { } layers)
        {
            var sizes = layers.Split(',', StringSplitOptions.TrimEntries);
            var parsed = new int[sizes.Length];
            for (int i = 0; i < sizes.Length; i++)
                if (!int.TryParse(sizes[i], NumberStyles.None, CultureInfo.InvariantCulture, out parsed[i]))
                    throw new ArgumentException($"--layers: '{sizes[i]}' is not a positive integer (expected e.g. 784,30,10)");
            model = model with { Layers = parsed };
        }
        if (parse.GetValue(ActivationOpt) is { } a) model = model with { Activation = Enum.Parse<Activation>(a, ignoreCase: true) };
        if (parse.GetValue(LossOpt) is { } l) model = model with { Loss = l == "quadratic" ? Loss.Quadratic : Loss.CrossEntropy };
        spec = spec with { Model = model };
        if (parse.GetValue(InitOpt) is { } init) spec = spec with { Init = Enum.Parse<InitScheme>(init, ignoreCase: true) };

        var optimizer = spec.Optimizer;
        if (parse.GetValue(MomentumOpt) is { } m) optimizer = optimizer with { Momentum = m, Kind = m > 0 ? OptimizerKind.Momentum : optimizer.Kind };
        if (parse.GetValue(OptimizerOpt) is { } o)
        {
            optimizer = optimizer with { Kind = Enum.Parse<OptimizerKind>(o, ignoreCase: true) };
            if (optimizer.Kind == OptimizerKind.Nesterov && optimizer.Momentum == 0) optimizer = optimizer with { Momentum = 0.9f };
        }
        if (parse.GetValue(Lr) is { } lr) optimizer = optimizer with { LearningRate = lr };
        if (parse.GetValue(WeightDecay) is { } wd) optimizer = optimizer with { WeightDecay = wd };
        if (parse.GetValue(Beta1) is { } b1) optimizer = optimizer with { Beta1 = b1 };
        if (parse.GetValue(Beta2) is { } b2) optimizer = optimizer with { Beta2 = b2 };
        if (parse.GetValue(Eps) is { } eps) optimizer = optimizer with { Eps = eps };
        if (parse.GetValue(LrStepEpochs) is { } stepEpochs) optimizer = optimizer with { Schedule = ScheduleKind.Step, LrStepEpochs = stepEpochs };
        if (parse.GetValue(Schedule) is { } schedule) optimizer = optimizer with { Schedule = Enum.Parse<ScheduleKind>(schedule.Replace("-", ""), ignoreCase: true) };
        if (parse.GetValue(LrGamma) is { } gamma) optimizer = optimizer with { LrGamma = gamma };
        if (parse.GetValue(LrMin) is { } lrMin) optimizer = optimizer with { LrMin = lrMin };
        if (parse.GetValue(WarmupSteps) is { } warmup) optimizer = optimizer with { WarmupSteps = warmup };
        spec = spec with { Optimizer = optimizer };
        if (parse.GetValue(ClipNorm) is { } clip) spec = spec with { ClipNorm = clip };

        if (parse.GetValue(BatchSize) is { } b) spec = spec with { BatchSize = b, ChunkSize = RunSpec.DefaultChunkSize(b) };
        if (parse.GetValue(ChunkSize) is { } c) spec = spec with { ChunkSize = c };
        if (parse.GetValue(Epochs) is { } e) spec = spec with { Epochs = e };
        if (parse.GetValue(Workers) is { } w) spec = spec with { Workers = w };
        if (parse.GetValue(Seed) is { } s) spec = spec with { Seed = s };
        if (parse.GetValue(TrainLimit) is { } t) spec = spec with { TrainLimit = t };
        if (parse.GetValue(CheckpointEvery) is { } k) spec = spec with { CheckpointEvery = k };
        if (parse.GetValue(ServerShards) is { } shards) spec = spec with { ServerShards = shards };
        if (parse.GetValue(Validation) is { } v) spec = spec with { Validation = v };
        if (parse.GetValue(EarlyStop) is { } patience) spec = spec with { EarlyStop = patience };
        if (parse.GetValue(Augment) is { } augment) spec = spec with { Augment = augment };
        if (parse.GetValue(Keep) is { } keep) spec = spec with { KeepBest = keep == "best" };
        spec = spec with { Dataset = DatasetCatalog.Resolve(parse.GetValue(Dataset)!) };
        spec.Validate();
        return spec;
    }

    private static async Task<int> Run(ParseResult parse, CancellationToken cancel)
    {
        var spec = BuildSpec(parse);
        string runId = parse.GetValue(RunId) ?? $"run-{DateTime.UtcNow:yyyyMMdd-HHmmss}-{Random.Shared.Next(0x10000):x4}";
        Backprop.Core.RunIds.Validate(runId);
        string dataDir = parse.GetValue(DataDir)!;
        var address = Address.Parse(parse, fallbackGateway: null);

        ClusterConnection cluster;
        Task<bool> warming = Task.FromResult(false);
        using var runLock = address is null ? RunLock.Take(ClusterConnection.StateDirectory(dataDir), runId) : null;
        if (address is null)
        {
            int threads = Cli.CheckThreadsPerWorker(parse.GetValue(ThreadsPerWorker) ?? Math.Max(1, Environment.ProcessorCount / spec.Workers));
            spec.Validate(threads);
            if (parse.GetValue(HttpPort) is < 1 or > 65535) throw new ArgumentException($"--http-port: {parse.GetValue(HttpPort)} is outside 1..65535");
            DataCommand.Ensure(spec.Dataset, dataDir);
            // On the core the silo's start leaves idle; awaited before the run starts, so that it never competes with it.
            warming = Task.Run(() => Warmup.Run(spec, threads), cancel);
            cluster = await ClusterConnection.StartEmbedded(dataDir, threads, cancel, parse.GetValue(HttpPort));
        }
        else
        {
            if (parse.GetValue(ThreadsPerWorker) is not null)
                throw new ArgumentException("--threads-per-worker: set it on the silos (--worker-threads); it applies to the embedded cluster only");
            // The layers follow the data: a folder of the user's is read here to size them unless --layers does.
            if (!DatasetCatalog.IsBuiltIn(spec.Dataset) && parse.GetValue(Layers) is null)
            {
                if (!Directory.Exists(spec.Dataset))
                    throw new ArgumentException($"--dataset: {spec.Dataset} is not on this machine to size the input and output layers; give --layers (the silos read the folder at that path)");
                spec = FitLayers(parse, spec, DatasetCatalog.LoadOwn(spec.Dataset).Train);
            }
            if (parse.GetValue(HttpPort) is not null)
                throw new ArgumentException("--http-port: the embedded silo's; on a cluster each silo serves its own page (silo --http-port)");
            cluster = await ClusterConnection.Connect(address, cancel);
        }
        await using (cluster)
        {
            if (cluster.IsEmbedded)
            {
                // Same process: load and check the data here so a damaged file is a usage error, not a failed run.
                var data = await cluster.Services.GetRequiredService<DatasetCache>().Get(spec.Dataset);
                spec = FitLayers(parse, spec, data.Train);
                spec.Validate(parse.GetValue(ThreadsPerWorker) ?? Math.Max(1, Environment.ProcessorCount / spec.Workers));
                spec.ValidateAgainst(data.Train);
            }
            else if (parse.GetValue(Workers) is null || parse.GetValue(ServerShards) is null)
            {
                // One worker and one shard per worker silo: the cluster's size, not the preset's, decides how the work is cut.
                var silos = await cluster.Client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key).WorkerSilos();
                if (parse.GetValue(Workers) is null) spec = spec with { Workers = Math.Clamp(silos.Length, 1, RunSpec.MaxWorkers) };
                if (parse.GetValue(ServerShards) is null) spec = spec with { ServerShards = DefaultShards(spec, silos.Length) };
            }
            if (cluster.IsEmbedded && parse.GetValue(ServerShards) is null)
                spec = spec with { ServerShards = DefaultShards(spec, Math.Min(Environment.ProcessorCount, spec.Workers)) };
            var run = cluster.Client.GetGrain<IRunGrain>(runId);
            Console.WriteLine($"run {runId} on {cluster.Description}");
            Console.WriteLine($"  {RunReporter.Describe(spec)}");
            await Warmed(warming);
            await run.Start(spec);
            return await Follow.FollowAndSave(parse, cluster, run, cancel);
        }
    }

    /// <summary>
    /// Waits for the warm-up (<see cref="Warmup"/>). It only saves time: one that failed (a spec it could not build a
    /// trainer for, say) changes nothing of the run, which reports its own errors. Ctrl+C meanwhile ends the command.
    /// </summary>
    private static async Task Warmed(Task<bool> warming)
    {
        try
        {
            await warming;
        }
        catch (Exception e) when (e is ArgumentException or InvalidOperationException)
        {
        }
    }

    /// <summary>The input and output layers sized to the data (any image size, any class count) unless --layers gave them.</summary>
    private static RunSpec FitLayers(ParseResult parse, RunSpec spec, Backprop.Core.Data.Dataset train)
    {
        if (parse.GetValue(Layers) is not null) return spec;
        spec = spec.FittedTo(train);
        spec.Validate();
        return spec;
    }

    /// <summary>The default shard count, as many as asked where the model has room for them (a slice is at least 16 floats).</summary>
    private static int DefaultShards(RunSpec spec, int wanted)
    {
        int shards = Math.Clamp(wanted, 1, Backprop.Core.Training.ShardLayout.MaxShards);
        while (shards > 1 && !IsValid(spec with { ServerShards = shards })) shards--;
        return shards;

        static bool IsValid(RunSpec spec)
        {
            try { spec.Shards.Validate(); return true; } catch (ArgumentException) { return false; }
        }
    }

    private static Option<string?> Choice(string name, string description, IReadOnlyList<string> values)
    {
        var option = new Option<string?>(name) { Description = description };
        option.AcceptOnlyFromAmong([.. values]);
        return option;
    }

    private static Option<string> Choice(string name, string description, IReadOnlyList<string> values, string fallback)
    {
        var option = new Option<string>(name) { Description = description, DefaultValueFactory = _ => fallback };
        option.AcceptOnlyFromAmong([.. values]);
        return option;
    }
}
