using System.Collections.Concurrent;
using System.Diagnostics;
using Backprop.Core;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Orleans.Storage;
using Xunit.Abstractions;

namespace Backprop.Tests.Cluster;

/// <summary>
/// A client sends hostile arguments, generated from a fixed seed, to every method of every grain interface while a
/// run trains (one after another, so that one is always training): sizes, undefined enum values, bad and long ids, wrong
/// and huge incarnations, steps, sessions, payloads shorter and longer than their spec says, nulls. Every call must
/// return or throw at the caller (a response timeout or a lost silo is a failure), every silo must still be up, every
/// run that trained meanwhile must end with the bits of a single process, a finished run must keep its parameters,
/// and a run started afterwards must train to the bits of a single process.
///
/// The coordinator calls of a run a coordinator drives (attach, move, checkpoint) get its true incarnation half the
/// time, with made-up coordinator keys: the key, which only the run record and its coordinator hold, must keep them
/// out. Blocks and pulls carry made-up sessions (drawn at random by each attach, like the key). The fuzz drives a run of its own instead, "sandbox", whose stored record names it as the
/// coordinator, so that its blocks get past the ownership checks to the checks of sizes and cuts; and a second one,
/// "workbench", whose shards only its workers' blocks reach (so they stay at one version), so that work with a single
/// hostile field gets past the workers' checks to the backprop and the pushes.
/// </summary>
[Collection("cluster")]
public sealed class GrainBoundaryFuzzTests(ITestOutputHelper output)
{
    private const int Seed = 1407;
    private const int Callers = 6;
    private const int CallsPerCaller = 500;

    [Fact]
    public async Task Hostile_calls_to_every_grain_method_fail_at_the_caller_and_leave_the_cluster_training_the_same_bits()
    {
        await using var fixture = new ClusterFixture();
        await fixture.InitializeAsync();
        var client = fixture.Cluster.Client;
        var world = new World(fixture);

        // A finished run, whose parameters must not change; the sandbox run, whose coordinator the fuzz is; runs that train throughout.
        await RunToEnd(client, World.Done, world.DoneSpec);
        string doneModel = await ModelHash(client, World.Done);
        await world.StartSandboxes();
        using var fuzzing = new CancellationTokenSource();
        var victims = world.KeepAVictimTraining(fuzzing.Token);

        var calls = new HostileCalls(client, world);
        Assert.Equal(GrainMethods(), calls.Methods.Keys.Order());
        var outcomes = new ConcurrentDictionary<string, int>();
        var broken = new ConcurrentQueue<string>();
        var clock = Stopwatch.StartNew();
        await Task.WhenAll(Enumerable.Range(0, Callers).Select(caller => Task.Run(async () =>
        {
            var random = new Random(Seed + caller);
            var methods = calls.Methods.ToArray();
            for (int i = 0; i < CallsPerCaller; i++)
            {
                var (name, call) = methods[random.Next(methods.Length)];
                string described = "";
                Exception? error = null;
                try
                {
                    await call(random, d => described += described.Length == 0 ? d : ", " + d);
                }
                catch (Exception e)
                {
                    error = e;
                }
                outcomes.AddOrUpdate($"{name}: {error?.GetType().Name ?? "ok"}", 1, (_, n) => n + 1);
                if (error is not null && Breaks(error)) broken.Enqueue($"{name}({described}): {error.GetType().Name}: {error.Message}");
                if (error is not null && !(error is ArgumentException or StaleCoordinatorException or ShardMovedException or InvalidOperationException
                    or InvalidDataException or DataMismatchException))
                    output.WriteLine($"unexpected: {name}({described}): {error.GetType().Name}: {error.Message}");
            }
        })));
        fuzzing.Cancel();
        string[] trained = await victims;
        int total = outcomes.Values.Sum();
        output.WriteLine($"{total} hostile calls from seed {Seed} in {clock.Elapsed.TotalSeconds:F1} s, over {calls.Methods.Count} grain methods, "
            + $"while {trained.Length} runs trained one after another:");
        foreach (var (outcome, count) in outcomes.OrderBy(o => o.Key, StringComparer.Ordinal)) output.WriteLine($"  {outcome}: {count}");
        Assert.Equal(Callers * CallsPerCaller, total);
        Assert.True(broken.IsEmpty, string.Join("\n", broken));

        // Every silo still up and a member of the cluster.
        foreach (var silo in fixture.Cluster.Silos)
            Assert.False(silo.ServiceProvider.GetRequiredService<IHostApplicationLifetime>().ApplicationStopping.IsCancellationRequested, $"silo {silo.Name} is stopping");
        var hosts = await client.GetGrain<IManagementGrain>(0).GetHosts(onlyActive: true);
        Assert.Equal(fixture.Cluster.Silos.Select(s => s.SiloAddress).Order(), hosts.Keys.Order());

        string expected = Expected(fixture, world.VictimSpec);
        foreach (var victim in trained)
            Assert.Equal(expected, (await WaitForEnd(client.GetGrain<IRunGrain>(victim))).Epochs[^1].ParameterSha256);
        Assert.Equal(doneModel, await ModelHash(client, World.Done));
        var after = await RunToEnd(client, "fuzz-after", world.AfterSpec);
        Assert.Equal(Expected(fixture, world.AfterSpec), after.Epochs[^1].ParameterSha256);

        // The run list holds only runs that were started: none of the made-up ids the fuzz sent.
        var listed = await client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key).List();
        Assert.All(listed, r => Assert.True(r.RunId is World.Done or "fuzz-after" || trained.Contains(r.RunId) || r.RunId.StartsWith("fuzz-new-"), $"listed: {r.RunId}"));
    }

    /// <summary>
    /// A response timeout or a silo out of reach: the call hung or took something down. A runtime error of unchecked
    /// input: a value reached code that took it for valid (in a grain, or in this test's generators); Core's own
    /// range guards (ArgumentOutOfRangeException) count too, since the grains must refuse such values with an
    /// ArgumentException of their own before. An exception that could not cross the wire: the caller would not
    /// learn why its call failed.
    /// </summary>
    private static bool Breaks(Exception e) =>
        e is TimeoutException or SiloUnavailableException or OrleansMessageRejectionException or OutOfMemoryException or ArgumentOutOfRangeException
            or NullReferenceException or IndexOutOfRangeException or DivideByZeroException or OverflowException or InvalidCastException
            or Orleans.Serialization.CodecNotFoundException;

    /// <summary>"IRunGrain.Start", ... for every method of every grain interface of the product.</summary>
    private static IEnumerable<string> GrainMethods() =>
        typeof(IRunGrain).Assembly.GetTypes().Where(t => t.IsInterface && typeof(IGrain).IsAssignableFrom(t))
            .SelectMany(t => t.GetMethods().Select(m => $"{t.Name}.{m.Name}")).Order();

    private static string Expected(ClusterFixture fixture, RunSpec spec)
    {
        using var local = new LocalTrainer(spec, fixture.Data.Train);
        for (int e = 0; e < spec.Epochs; e++) local.TrainEpoch(e);
        return ParameterHash.Sha256(local.Parameters);
    }

    private static async Task<string> ModelHash(IClusterClient client, string runId) =>
        ParameterHash.Sha256((await client.GetGrain<IRunGrain>(runId).GetModel()).Parameters.Span);

    private static async Task<RunStatus> RunToEnd(IClusterClient client, string runId, RunSpec spec)
    {
        var run = client.GetGrain<IRunGrain>(runId);
        await run.Start(spec);
        return await WaitForEnd(run);
    }

    private static async Task<RunStatus> WaitForEnd(IRunGrain run)
    {
        var clock = Stopwatch.StartNew();
        var status = await run.GetStatus();
        while (!status.IsFinished && clock.Elapsed < TimeSpan.FromSeconds(120))
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.True(status.State == RunState.Completed, $"{status.RunId}: {status.State}: {status.Error}");
        return status;
    }

    /// <summary>The runs the fuzz aims at, and where the sandbox run stands (as far as the fuzz knows).</summary>
    private sealed class World(ClusterFixture fixture)
    {
        public const string Done = "fuzz-done", Sandbox = "fuzz-sandbox", Workbench = "fuzz-workbench", Unknown = "fuzz-unknown";
        /// <summary>The sandbox's and the workbench's coordinator incarnation, which the fuzz holds; the other runs' coordinators hold 1.</summary>
        public const int SandboxIncarnation = 5;
        /// <summary>The attach session the fuzz mostly moves the sandbox's shards to (some moves take another one), and the workbench's.</summary>
        public const long SandboxSession = 1;
        public const long SandboxKey = 3;

        // It clips its gradient: its shards send their parts of each step's norm to shard 0, which hostile parts must not reach.
        public RunSpec VictimSpec { get; } = Presets.PyTorchMlp with { Epochs = 3, Workers = 3, ServerShards = 3, Seed = 53, CheckpointEvery = 5, ClipNorm = 0.05 };
        public RunSpec DoneSpec { get; } = Presets.PyTorchMlp with { Epochs = 1, Workers = 2, ServerShards = 2, Seed = 51 };
        public RunSpec SandboxSpec { get; } = Presets.PyTorchMlp with { Epochs = 2, Workers = 2, ServerShards = 2, Seed = 52 };
        public RunSpec WorkbenchSpec { get; } = Presets.PyTorchMlp with { Epochs = 2, Workers = 2, ServerShards = 2, Seed = 55 };
        public RunSpec AfterSpec { get; } = Presets.PyTorchMlp with { Epochs = 1, Workers = 4, ServerShards = 2, Seed = 54 };
        public string DatasetSha256 { get; } = fixture.DatasetSha256;

        // Each sandbox shard's version, as its last successful call said (the fuzz applies steps to one shard at a time).
        private readonly long[] _steps = [0, 0];
        public long SandboxStep(int shard) => Volatile.Read(ref _steps[Math.Clamp(shard, 0, 1)]);
        public void SandboxStep(int shard, long step) => Volatile.Write(ref _steps[Math.Clamp(shard, 0, 1)], step);

        private long _workbenchVersion;
        /// <summary>The version the workbench's shards are at: a block applied everywhere moves them to the next.</summary>
        public long WorkbenchVersion => Volatile.Read(ref _workbenchVersion);
        public void WorkbenchApplied(long version, int steps) => Interlocked.CompareExchange(ref _workbenchVersion, version + steps, version);

        public RunSpec SpecOf(string runId) => runId switch
        {
            Done => DoneSpec, Sandbox => SandboxSpec, Workbench => WorkbenchSpec, _ when runId == Victim => VictimSpec, _ => AfterSpec,   // a valid spec for ids of no run
        };

        private string _victim = "";
        /// <summary>The run training now.</summary>
        public string Victim => Volatile.Read(ref _victim);

        /// <summary>Starts a run, and the next one when it ends, until <paramref name="stop"/>; returns their ids.</summary>
        public async Task<string[]> KeepAVictimTraining(CancellationToken stop)
        {
            var started = new List<string>();
            while (!stop.IsCancellationRequested)
            {
                string id = $"fuzz-victim-{started.Count + 1}";
                var run = fixture.Cluster.Client.GetGrain<IRunGrain>(id);
                var status = await run.Start(VictimSpec);
                started.Add(id);
                Volatile.Write(ref _victim, id);
                while (!status.IsFinished && !stop.IsCancellationRequested) status = await run.WaitForFinish(TimeSpan.FromSeconds(1));
            }
            return [.. started];
        }

        /// <summary>Stores the sandbox's and the workbench's records as a coordinator would, and attaches their shards at version 0.</summary>
        public async Task StartSandboxes()
        {
            var storage = fixture.Cluster.Silos[0].ServiceProvider.GetRequiredKeyedService<IGrainStorage>(SiloSetup.StorageName);
            foreach (var (run, spec) in new[] { (Sandbox, SandboxSpec), (Workbench, WorkbenchSpec) })
            {
                var state = new GrainState<RunRecord>
                {
                    State = new RunRecord { Spec = spec, State = RunState.Running, Incarnation = SandboxIncarnation, DatasetSha256 = DatasetSha256, CoordinatorKey = SandboxKey },
                };
                await storage.WriteStateAsync("run", fixture.Cluster.Client.GetGrain<IRunGrain>(run).GetGrainId(), state);
                for (int j = 0; j < spec.ServerShards; j++)
                {
                    var shard = fixture.Cluster.Client.GetGrain<IParameterShardGrain>($"{run}/{j}");
                    await shard.Attach(spec, SandboxIncarnation, SandboxKey);
                    await shard.MoveTo(SandboxIncarnation, SandboxKey, SandboxSession, 0);
                }
            }
        }
    }

    /// <summary>One generator per grain method: it picks a grain and arguments, describes them, and makes the call.</summary>
    private sealed class HostileCalls
    {
        private static readonly int[] Ints = [int.MinValue, -65537, -1, 0, 1, 2, 3, 7, 16, 64, 65537, 1_000_001, int.MaxValue];
        private static readonly long[] Longs = [long.MinValue, int.MinValue, -1, 0, 1, 2, 5, 18, 19, int.MaxValue, 1L + int.MaxValue, long.MaxValue];
        private static readonly float[] Floats = [float.NaN, float.PositiveInfinity, float.NegativeInfinity, float.MaxValue, -1, 0, float.Epsilon, 0.01f, 0.9f, 1, 1e30f];
        private static readonly double[] Doubles = [double.NaN, double.PositiveInfinity, double.NegativeInfinity, double.MaxValue, -1, 0, 1.5];
        private static readonly int[] EnumValues = [int.MinValue, -1, 0, 1, 2, 3, 4, 7, 42, int.MaxValue];
        private static readonly string?[] Datasets = [null, "", "mnist", "fashion-mnist", "MNIST", "../../etc", "mnist/../mnist", new string('d', 10_000)];
        private static readonly string[] BadIds = ["", " ", "a/b", "/", "../x", "-lead", "run id", "ü", "a\0b", new string('r', 101), new string('r', 10_000)];
        private static readonly int[]?[] Layers =
        [
            null, [], [784], [784, 10], [784, 0, 10], [784, -1, 10], [784, int.MaxValue, 10], [784, 65537, 10], [784, 65536, 10],
            [10, 10], [784, 128, 64, 1], [.. Enumerable.Repeat(784, 18)], new int[100_000],
        ];
        private static readonly int[]?[] Cuts =
        [
            null, [], [0], [0, 1], [0, 2], [0, 1, 2, 3], [0, 2, 3], [1], [-1], [0, 0], [0, int.MaxValue], [0, int.MinValue], new int[100_000],
            [.. Enumerable.Range(0, 5_000)],
        ];
        private static readonly TimeSpan[] Waits = [TimeSpan.MinValue, TimeSpan.FromTicks(-1), TimeSpan.Zero, TimeSpan.FromMilliseconds(1), TimeSpan.FromMilliseconds(50), TimeSpan.MaxValue];

        private readonly IClusterClient _client;
        private readonly World _world;
        private int _fresh;

        public HostileCalls(IClusterClient client, World world)
        {
            (_client, _world) = (client, world);
            Methods = new Dictionary<string, Func<Random, Action<string>, Task>>
            {
                ["IRunGrain.Start"] = Start,
                ["IRunGrain.GetStatus"] = (r, say) => Run(r, say, victimToo: true).GetStatus(Say(say, Pick(r, Ints))),
                ["IRunGrain.WaitForFinish"] = (r, say) => Run(r, say, victimToo: true).WaitForFinish(Say(say, Pick(r, Waits)), Pick(r, Ints)),
                ["IRunGrain.Cancel"] = (r, say) => Run(r, say, victimToo: false).Cancel(),
                ["IRunGrain.Resume"] = (r, say) => Run(r, say, victimToo: true).Resume(),
                ["IRunGrain.GetModel"] = (r, say) => Run(r, say, victimToo: true).GetModel(),
                ["IRunGrain.Forget"] = (r, say) => Run(r, say, victimToo: true).Forget(),
                ["IParameterShardGrain.Attach"] = Attach,
                ["IParameterShardGrain.MoveTo"] = MoveTo,
                ["IParameterShardGrain.Push"] = Push,
                ["IParameterShardGrain.Pull"] = Pull,
                ["IParameterShardGrain.GradientNorm"] = GradientNorm,
                ["IParameterShardGrain.GetParameters"] = (r, say) => Shard(r, say, out _, out _).GetParameters(),
                ["IParameterShardGrain.Checkpoint"] = (r, say) =>
                {
                    var shard = Shard(r, say, out var run, out int j);
                    return shard.Checkpoint(Say(say, OwnerIncarnation(r, run)), Say(say, CoordinatorKey(r, run)), Say(say, Step(r, run, j)));
                },
                ["IParameterShardGrain.Retire"] = (r, say) => Shard(r, say, out _, out _).Retire(),
                ["IParameterShardGrain.Forget"] = (r, say) => Shard(r, say, out _, out _).Forget(),
                ["IWorkerGrain.ComputeBlock"] = ComputeBlock,
                ["IWorkerGrain.Evaluate"] = Evaluate,
                ["IRunRegistryGrain.Update"] = (r, say) => Registry(r, say).Update(Say(say, Summary(r))!),
                ["IRunRegistryGrain.List"] = (r, say) => Registry(r, say).List(),
                ["IRunRegistryGrain.Running"] = (r, say) => Registry(r, say).Running(),
                ["IRunRegistryGrain.WorkerSilos"] = (r, say) => Registry(r, say).WorkerSilos(),
                ["IRunRegistryGrain.IsBeingDeleted"] = (r, say) => Registry(r, say).IsBeingDeleted(Say(say, RunId(r))),
            };
        }

        public IReadOnlyDictionary<string, Func<Random, Action<string>, Task>> Methods { get; }

        private static T Pick<T>(Random r, T[] values) => values[r.Next(values.Length)];

        private static T Say<T>(Action<string> say, T value)
        {
            say(value switch
            {
                null => "null",
                string s => $"'{(s.Length > 40 ? s[..40] + "..." : s)}'",
                int[] a => $"int[{a.Length}]",
                // Records print their computed properties too, which throw on the values sent here.
                RunSpec spec => $"spec(layers {(spec.Model.Layers is { } l ? $"int[{l.Length}]" : "null")}, {(int)spec.Model.Activation}, {(int)spec.Model.Loss}, "
                    + $"init {(int)spec.Init}, optimizer {(int)spec.Optimizer.Kind} {spec.Optimizer.LearningRate} {spec.Optimizer.Momentum}, batch {spec.BatchSize}, "
                    + $"chunk {spec.ChunkSize}, epochs {spec.Epochs}, workers {spec.Workers}, seed {spec.Seed}, dataset {spec.Dataset?.Length.ToString() ?? "null"} chars, "
                    + $"train {spec.TrainLimit}, checkpoint {spec.CheckpointEvery}, shards {spec.ServerShards})",
                BlockWork w => $"work(incarnation {w.Incarnation}, epoch {w.Epoch}, step {w.Step}, version {w.Version}, block {w.Block}, "
                    + $"cut {(w.BlockStarts is { } c ? $"int[{c.Length}]" : "null")}, sha {w.DatasetSha256?.Length.ToString() ?? "null"} chars, session {w.Session})",
                _ => value.ToString()!,
            });
            return value;
        }

        /// <summary>
        /// A run that exists (finished, running, or the fuzz's own: often, so that calls get past the ownership checks),
        /// one never started, or an id no run may have.
        /// </summary>
        private string RunId(Random r, bool victimToo = true, bool sandboxToo = true) => r.Next(8) switch
        {
            < 3 when sandboxToo => World.Sandbox,
            3 when victimToo => _world.Victim,
            4 => World.Done,
            5 => World.Unknown,
            _ => Pick(r, BadIds),
        };

        /// <summary>Never the true incarnation of a run a coordinator drives; mostly the sandbox's for the sandbox (the fuzz's own).</summary>
        private static int Incarnation(Random r, string run) =>
            run == World.Sandbox && r.Next(4) > 0 ? World.SandboxIncarnation : Pick(r, Ints.Where(i => i != 1).ToArray());

        /// <summary>Like <see cref="Incarnation"/>, but the victim's true one half the time: without its coordinator key it must knock nothing off.</summary>
        private int OwnerIncarnation(Random r, string run) => run == _world.Victim && r.Next(2) == 0 ? 1 : Incarnation(r, run);

        private static long CoordinatorKey(Random r, string run) => run == World.Sandbox && r.Next(4) > 0 ? World.SandboxKey : Pick(r, Longs);

        private static long Session(Random r, string run) => run == World.Sandbox && r.Next(4) > 0 ? World.SandboxSession : Pick(r, Longs);

        private long Step(Random r, string run, int shard) =>
            run == World.Sandbox && r.Next(4) > 0 ? _world.SandboxStep(shard) + (r.Next(4) == 0 ? -1 : 0) : Pick(r, Longs);

        /// <summary>The run's spec, or one with up to three fields made hostile (often out of range, sometimes valid), or null.</summary>
        private RunSpec? Spec(Random r, string run)
        {
            if (r.Next(12) == 0) return null;
            var s = _world.SpecOf(run);
            for (int n = r.Next(4); n > 0; n--)
                s = r.Next(15) switch
                {
                    0 => s with { Model = s.Model with { Layers = Pick(r, Layers)! } },
                    1 => s with { Model = s.Model with { Activation = (Activation)Pick(r, EnumValues) } },
                    2 => s with { Model = s.Model with { Loss = (Loss)Pick(r, EnumValues) } },
                    3 => s with { Init = (InitScheme)Pick(r, EnumValues) },
                    4 => s with { Optimizer = s.Optimizer with { Kind = (OptimizerKind)Pick(r, EnumValues) } },
                    5 => s with { Optimizer = s.Optimizer with { LearningRate = Pick(r, Floats) } },
                    6 => s with { Optimizer = s.Optimizer with { Momentum = Pick(r, Floats) } },
                    7 => s with { BatchSize = Pick(r, Ints) },
                    8 => s with { ChunkSize = Pick(r, Ints) },
                    9 => s with { Epochs = Pick(r, Ints) },
                    10 => s with { Workers = Pick(r, Ints) },
                    11 => s with { Seed = Pick(r, Longs) },
                    12 => s with { Dataset = Pick(r, Datasets)! },
                    13 => s with { TrainLimit = Pick(r, Ints), CheckpointEvery = Pick(r, Ints) },
                    _ => s with { ServerShards = Pick(r, Ints) },
                };
            return s;
        }

        private IRunGrain Run(Random r, Action<string> say, bool victimToo) =>
            _client.GetGrain<IRunGrain>(Say(say, RunId(r, victimToo, sandboxToo: false)));

        /// <summary>Start of a run that exists (another spec is refused) or of a new id; a new run that starts is cancelled at once.</summary>
        private async Task Start(Random r, Action<string> say)
        {
            string run = r.Next(3) == 0 ? $"fuzz-new-{Interlocked.Increment(ref _fresh)}" : RunId(r, sandboxToo: false);
            if (run == World.Unknown) run = Pick(r, BadIds);   // stays unknown: the other methods are sent to it
            var grain = _client.GetGrain<IRunGrain>(Say(say, run));
            await grain.Start(Say(say, Spec(r, run))!);
            if (run.StartsWith("fuzz-new-")) await grain.Cancel();
        }

        private IParameterShardGrain Shard(Random r, Action<string> say, out string run, out int shard)
        {
            run = RunId(r);
            shard = r.Next(4) == 0 ? Pick(r, Ints) : r.Next(3);
            string key = r.Next(10) switch
            {
                > 4 when run == World.Sandbox => $"{run}/{shard = r.Next(2)}",
                0 => Pick(r, BadIds),
                1 => $"{run}/0{shard}",
                2 => $"{run}/{shard}/0",
                _ => $"{run}/{shard}",
            };
            return _client.GetGrain<IParameterShardGrain>(Say(say, key));
        }

        private async Task Attach(Random r, Action<string> say)
        {
            var shard = Shard(r, say, out var run, out _);
            // The run's own spec half the time: only the incarnation is wrong then, which a shard used to take as a newer coordinator.
            // The victim's true incarnation too: without its coordinator key it must knock nothing off.
            await shard.Attach(Say(say, r.Next(2) == 0 ? _world.SpecOf(run) : Spec(r, run))!, Say(say, OwnerIncarnation(r, run)), Say(say, CoordinatorKey(r, run)));
        }

        private async Task MoveTo(Random r, Action<string> say)
        {
            var shard = Shard(r, say, out var run, out int j);
            long step = Say(say, Step(r, run, j));
            await shard.MoveTo(Say(say, OwnerIncarnation(r, run)), Say(say, CoordinatorKey(r, run)), Say(say, Session(r, run)), step);
            if (run == World.Sandbox) _world.SandboxStep(j, step);
        }

        private async Task Push(Random r, Action<string> say)
        {
            // Half the blocks are the sandbox's own with one hostile field (or none), so that they get past the ownership
            // checks to those of sizes, cuts and payloads; the others are hostile anywhere, to any shard.
            bool coherent = r.Next(2) == 0;
            string run = World.Sandbox;
            int j = r.Next(2);
            var shard = coherent ? _client.GetGrain<IParameterShardGrain>(Say(say, $"{run}/{j}")) : Shard(r, say, out run, out j);
            var spec = _world.SpecOf(run);
            int hostile = r.Next(10);
            bool Bad(int field) => coherent ? hostile == field : r.Next(2) == 0;
            var push = new GradientPush(
                Say(say, Bad(0) ? Pick(r, Ints) : coherent ? World.SandboxIncarnation : Incarnation(r, run)),
                Say(say, Bad(1) ? Pick(r, Longs) : coherent ? _world.SandboxStep(j) : Step(r, run, j)),
                Say(say, Bad(2) ? Pick(r, Ints) : 0),
                Say(say, Bad(3) ? Pick(r, Cuts) : [0])!,
                Say(say, Bad(4) ? Pick(r, Ints) : spec.BatchSize),
                Say(say, Bad(5) ? Pick(r, Doubles) : 0),
                Say(say, Bad(6) ? Pick(r, Doubles) : 1.5),
                Payload(r, say, spec, j, Bad(7))!,
                Say(say, Bad(8) ? Pick(r, Longs) : coherent ? World.SandboxSession : Session(r, run)));
            var reply = await shard.Push(push);
            if (run == World.Sandbox && reply.Next is { } next) _world.SandboxStep(j, next.Step);
        }

        /// <summary>A gradient slice of the shard's length, or (hostile) not finite, one more or less, none, or over the 64 MiB message cap.</summary>
        private static FloatPayload? Payload(Random r, Action<string> say, RunSpec spec, int shard, bool hostile)
        {
            int length = shard >= 0 && shard < spec.ServerShards ? spec.Shards.Length(shard) : 16;
            int kind = hostile ? r.Next(8) : 7;
            say($"payload kind {kind}");
            return kind switch
            {
                0 => null,
                1 => new FloatPayload([]),
                2 => new FloatPayload(new float[length - 1]),
                3 => new FloatPayload(new float[length + 1]),
                4 => new FloatPayload(Enumerable.Repeat(float.NaN, length).ToArray()),
                5 => new FloatPayload(Enumerable.Repeat(float.PositiveInfinity, length).ToArray()),
                6 when r.Next(5) == 0 => new FloatPayload(new float[(int)(ResourceLimits.MaxMessageBytes / sizeof(float)) + 1]),
                _ => new FloatPayload(Enumerable.Range(0, length).Select(i => (i % 7 - 3) * 0.01f).ToArray()),
            };
        }

        /// <summary>A part of a step's gradient norm: the tiles of shard 1 or 2 of the victim, or too few, negative, not finite, none.</summary>
        private async Task GradientNorm(Random r, Action<string> say)
        {
            var shard = Shard(r, say, out var run, out _);
            var spec = _world.SpecOf(run);
            int from = Say(say, r.Next(4) == 0 ? Pick(r, Ints) : 1 + r.Next(2));
            int tiles = from >= 0 && from < spec.ServerShards ? GradientClip.Tiles(spec.Shards.Length(from)) : 1;
            double[]? sums = r.Next(6) switch
            {
                0 => null,
                1 => new double[Math.Max(0, tiles - 1)],
                2 => Enumerable.Repeat(Pick(r, Doubles), tiles).ToArray(),
                _ => Enumerable.Repeat(1e6, tiles).ToArray(),
            };
            say($"tile sums {(sums is null ? "none" : $"{sums.Length} x {(sums.Length > 0 ? sums[0] : 0)}")}");
            await shard.GradientNorm(new NormPart(Say(say, OwnerIncarnation(r, run)), Say(say, Session(r, run)), Say(say, Step(r, run, 0)), from, sums!));
        }

        private async Task Pull(Random r, Action<string> say)
        {
            var shard = Shard(r, say, out var run, out int j);
            (await shard.Pull(Say(say, Session(r, run)), Say(say, Step(r, run, j)))).Parameters.Release();
        }

        /// <summary>"{run}/{incarnation}.{generation}/{index}", as the coordinators name workers (the victim's real ones too), or not.</summary>
        private IWorkerGrain Worker(Random r, Action<string> say, out string run)
        {
            run = RunId(r);
            string key = r.Next(8) switch
            {
                0 => Pick(r, BadIds),
                1 => $"{run}/x/0",
                2 => $"/{run}/1.0/0",
                _ => $"{run}/{(run == World.Sandbox ? World.SandboxIncarnation : r.Next(1, 3))}.{r.Next(2)}/{r.Next(4)}",
            };
            return _client.GetGrain<IWorkerGrain>(Say(say, key));
        }

        private string Sha(Random r) => r.Next(3) > 0 ? _world.DatasetSha256 : Pick(r, BadIds);

        private async Task ComputeBlock(Random r, Action<string> say)
        {
            if (r.Next(2) == 0)
            {
                await WorkbenchBlock(r, say);
                return;
            }
            var worker = Worker(r, say, out var run);
            int[]? cut = r.Next(2) == 0 ? [0, 2] : Pick(r, Cuts);
            var work = new BlockWork(Say(say, Spec(r, run))!, Incarnation(r, run), r.Next(2) == 0 ? 0 : Pick(r, Ints), r.Next(2) == 0 ? 0 : Pick(r, Ints),
                Step(r, run, 0), r.Next(3) == 0 ? Pick(r, Ints) : r.Next(2), cut!, r.Next(2) == 0 ? 0 : Pick(r, Doubles), Sha(r), Session(r, run),
                r.Next(3) == 0 ? Pick(r, Ints) : 1);
            await worker.ComputeBlock(Say(say, work));
        }

        /// <summary>A block of the workbench run with one hostile field (or none: a step the workbench's shards apply).</summary>
        private async Task WorkbenchBlock(Random r, Action<string> say)
        {
            var worker = _client.GetGrain<IWorkerGrain>(Say(say, $"{World.Workbench}/{World.SandboxIncarnation}.0/{r.Next(2)}"));
            long version = _world.WorkbenchVersion;
            int hostile = r.Next(13);
            var work = new BlockWork(hostile == 0 ? Spec(r, World.Workbench)! : _world.WorkbenchSpec, hostile == 1 ? Pick(r, Ints) : World.SandboxIncarnation,
                hostile == 2 ? Pick(r, Ints) : 0, hostile == 3 ? Pick(r, Ints) : r.Next(19), hostile == 4 ? Pick(r, Longs) : version,
                hostile == 5 ? Pick(r, Ints) : 0, hostile == 6 ? Pick(r, Cuts)! : [0], hostile == 7 ? Pick(r, Doubles) : 0,
                hostile == 8 ? Pick(r, BadIds) : _world.DatasetSha256, hostile == 9 ? Pick(r, Longs) : World.SandboxSession,
                hostile == 10 ? Pick(r, Ints) : 1);
            if (hostile == 0) Say(say, work.Spec);
            var done = await worker.ComputeBlock(Say(say, work));
            if (done.Applied > 0) _world.WorkbenchApplied(version, done.Applied);
        }

        private async Task Evaluate(Random r, Action<string> say)
        {
            if (r.Next(2) == 0)
            {
                // The workbench's current version, with one hostile field (or none).
                var evaluator = _client.GetGrain<IWorkerGrain>(Say(say, $"{World.Workbench}/{World.SandboxIncarnation}.0/{r.Next(2)}"));
                int hostile = r.Next(8), first = r.Next(400);
                var eval = new EvalWork(hostile == 0 ? Spec(r, World.Workbench)! : _world.WorkbenchSpec, hostile == 1 ? Pick(r, Ints) : World.SandboxIncarnation,
                    hostile == 2 ? Pick(r, Longs) : _world.WorkbenchVersion, hostile == 3 ? Pick(r, Ints) : first, hostile == 4 ? Pick(r, Ints) : first + r.Next(1, 200),
                    hostile == 5 ? Pick(r, BadIds) : _world.DatasetSha256, hostile == 6 ? Pick(r, Longs) : World.SandboxSession);
                say($"{eval with { Spec = null! }}");
                await evaluator.Evaluate(eval);
                return;
            }
            var worker = Worker(r, say, out var run);
            int start = r.Next(2) == 0 ? r.Next(400) : Pick(r, Ints);
            var work = new EvalWork(Say(say, Spec(r, run))!, Incarnation(r, run), Step(r, run, 0), start, r.Next(2) == 0 ? start + r.Next(1, 100) : Pick(r, Ints),
                Sha(r), Session(r, run));
            say($"{work with { Spec = null! }}");
            await worker.Evaluate(work);
        }

        private IRunRegistryGrain Registry(Random r, Action<string> say) =>
            _client.GetGrain<IRunRegistryGrain>(Say(say, r.Next(4) > 0 ? RunRegistryGrain.Key : Pick(r, BadIds)));

        /// <summary>
        /// Never the sandbox (listed as running, a watchdog would start a coordinator for it); the victim, said to be in
        /// another state, must be refused.
        /// </summary>
        private RunSummary? Summary(Random r) => r.Next(15) == 0 ? null
            : new RunSummary(RunId(r, sandboxToo: false), (RunState)(r.Next(2) == 0 ? r.Next(6) : Pick(r, EnumValues)), Pick(r, Ints), Pick(r, Ints),
                r.Next(2) == 0 ? null : Pick(r, Doubles), r.Next(2) == 0 ? DateTime.MinValue : DateTime.MaxValue);
    }
}
