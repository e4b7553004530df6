using Microsoft.Extensions.DependencyInjection;
using Backprop.Core.Numerics;
using Backprop.Core;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Messages;
using Backprop.Grains.Hosting;

namespace Backprop.Tests.Cluster;

[Collection("cluster")]
public sealed class SyncTrainingTests(ClusterFixture fixture)
{
    // 1,200 samples at batch 64 are 19 steps an epoch; two epochs give 38 steps of 4 chunks each.
    private static RunSpec Spec(int workers) => Presets.PyTorchMlp with { Epochs = 2, Workers = workers, Seed = 3 };

    private async Task<RunStatus> RunToEnd(string runId, RunSpec spec)
    {
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>(runId);
        var status = await run.Start(spec);
        var deadline = DateTime.UtcNow.AddSeconds(50);
        while (!status.IsFinished && DateTime.UtcNow < deadline)
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.True(status.State == RunState.Completed, $"run {runId} ended {status.State}: {status.Error}");
        return status;
    }

    [Fact]
    public async Task One_and_four_workers_give_bit_identical_parameters_equal_to_a_single_process()
    {
        var one = await RunToEnd("det-1", Spec(1));
        var four = await RunToEnd("det-4", Spec(4));

        var local = new LocalTrainer(Spec(1), fixture.Data.Train);
        local.TrainEpoch(0);
        local.TrainEpoch(1);
        string expected = ParameterHash.Sha256(local.Parameters);

        Assert.Equal(38, four.Epochs[^1].Steps);
        Assert.Equal(expected, one.Epochs[^1].ParameterSha256);
        Assert.Equal(expected, four.Epochs[^1].ParameterSha256);
        Assert.Equal(one.Epochs[0].ParameterSha256, four.Epochs[0].ParameterSha256);
        // Evaluation is cut into fixed blocks, so even the test loss (a double sum) is the same bits.
        Assert.Equal(one.Epochs.Select(e => e.TestLoss), four.Epochs.Select(e => e.TestLoss));

        var model = await fixture.Cluster.Client.GetGrain<IRunGrain>("det-4").GetModel();
        Assert.Equal(expected, ParameterHash.Sha256(model.Parameters.Span));
    }

    [Fact]
    public async Task Workers_of_a_run_are_spread_over_the_silos()
    {
        var status = await RunToEnd("spread", Spec(4) with { Epochs = 1 });
        Assert.True(status.WorkerSilos.Length >= 2, $"workers ran on {string.Join(", ", status.WorkerSilos)}");
        // Four workers over three silos, placed by index: all three silos take part.
        Assert.Equal(ClusterFixture.Silos, status.WorkerSilos.Length);
    }

    [Fact]
    public async Task A_cluster_run_learns_and_reports_every_epoch()
    {
        var status = await RunToEnd("learn", Spec(3) with { Epochs = 6 });
        Assert.Equal([1, 2, 3, 4, 5, 6], status.Epochs.Select(e => e.Epoch));
        // Chance is 10%. With seed 3 this run measured 28%, 51%, 72%, 89%, 100%, 100% per epoch;
        // 90% after six epochs is far above chance, and a broken step or reduction stays near it.
        Assert.True(status.Epochs[^1].TestAccuracy > 0.9, $"accuracy {string.Join(", ", status.Epochs.Select(e => e.TestAccuracy))}");
        Assert.True(status.Epochs[^1].TrainLoss < status.Epochs[0].TrainLoss);
        Assert.Equal(fixture.Data.Test.Count, status.Epochs[^1].Confusion.Sum());
    }

    [Fact]
    public async Task Bad_spec_is_refused_at_start_with_its_reason()
    {
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("bad-spec");
        var bad = Spec(2) with { Model = Spec(2).Model with { Layers = [100, 10] } };
        var e = await Assert.ThrowsAsync<ArgumentException>(() => run.Start(bad));
        Assert.Contains("input size 100", e.Message);
        // Run ids name grains, storage keys and files: long ones, and ones that would cut a grain key, are refused.
        var client = fixture.Cluster.Client;
        Assert.Contains("over the limit of 100", (await Assert.ThrowsAsync<ArgumentException>(() => client.GetGrain<IRunGrain>(new string('r', 300)).Start(Spec(2)))).Message);
        Assert.Contains("has '/'", (await Assert.ThrowsAsync<ArgumentException>(() => client.GetGrain<IRunGrain>("a/0").Start(Spec(2)))).Message);
        Assert.Contains("has '/'", (await Assert.ThrowsAsync<ArgumentException>(() => client.GetGrain<IParameterShardGrain>("a/b/0").Attach(Spec(2), 1, Key))).Message);
        Assert.Contains("over the limit", (await Assert.ThrowsAsync<ArgumentException>(() =>
            client.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key).Update(new RunSummary(new string('r', 300), RunState.Running, 0, 1, null, DateTime.UtcNow)))).Message);
    }

    [Fact]
    public async Task A_spec_whose_buffers_would_overflow_is_refused_by_every_grain_and_the_cluster_still_trains()
    {
        // The spec that used to kill every silo (32768 x 65536 floats wrapped an int buffer size).
        var overflow = Spec(1) with
        {
            Model = Spec(1).Model with { Layers = [784, 65536, 10] }, BatchSize = 32768, ChunkSize = 32768,
        };
        var start = await Assert.ThrowsAsync<ArgumentException>(() => fixture.Cluster.Client.GetGrain<IRunGrain>("overflow").Start(overflow));
        Assert.Contains("over the limit", start.Message);
        // Sent straight to the grains that allocate, bypassing Start: refused before allocating.
        var shard = fixture.Cluster.Client.GetGrain<IParameterShardGrain>("overflow-direct/0");
        await Assert.ThrowsAsync<ArgumentException>(() => shard.Attach(overflow, 1, Key));
        var worker = fixture.Cluster.Client.GetGrain<IWorkerGrain>("overflow-direct/1.0/0");
        await Assert.ThrowsAsync<ArgumentException>(() => worker.ComputeBlock(new BlockWork(overflow, 1, 0, 0, 0, 0, [0], 0, fixture.DatasetSha256, Session)));

        var after = await RunToEnd("after-overflow", Spec(2) with { Epochs = 1 });
        Assert.Single(after.Epochs);
    }

    [Fact]
    public async Task Cancel_stops_a_run()
    {
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("cancel");
        await run.Start(Spec(2) with { Epochs = 1000 });
        await run.Cancel();
        var status = await run.WaitForFinish(TimeSpan.FromSeconds(20));
        Assert.Equal(RunState.Cancelled, status.State);
    }

    /// <summary>AdamW with weight decay and a cosine schedule after a warm-up: two state vectors a shard, and a rate that depends on the run's length.</summary>
    private static readonly OptimizerSettings AdamW = new(OptimizerKind.AdamW, 2e-3f, 0, WeightDecay: 0.01, Schedule: ScheduleKind.Cosine, WarmupSteps: 5, LrMin: 1e-4);

    [Theory]
    [InlineData(1, false, 0)]
    [InlineData(2, false, 0)]
    [InlineData(3, false, 0)]
    [InlineData(7, false, 0)]
    [InlineData(1, true, 0)]
    [InlineData(2, true, 0)]
    [InlineData(3, true, 0)]
    // Clipped: the shards' norm parts added up by shard 0 (a bound of 0.05 clips steps of this run: checked against the run without it).
    [InlineData(1, false, 0.05)]
    [InlineData(2, true, 0.05)]
    [InlineData(3, false, 0.05)]
    [InlineData(7, true, 0.05)]
    public async Task Any_shard_and_worker_count_gives_the_bits_of_a_single_process(int shards, bool adamW, double clipNorm)
    {
        var spec = Spec(1) with { Epochs = 1, Seed = 11, ServerShards = shards, ClipNorm = clipNorm };
        if (adamW) spec = spec with { Optimizer = AdamW };
        using var local = new LocalTrainer(spec, fixture.Data.Train);
        local.TrainEpoch(0);
        string expected = ParameterHash.Sha256(local.Parameters);
        if (clipNorm > 0)
        {
            using var unclipped = new LocalTrainer(spec with { ClipNorm = 0 }, fixture.Data.Train);
            unclipped.TrainEpoch(0);
            Assert.NotEqual(expected, ParameterHash.Sha256(unclipped.Parameters));
        }
        foreach (int workers in new[] { 1, 3, 4 })
        {
            var status = await RunToEnd($"shards-{shards}-workers-{workers}{(adamW ? "-adamw" : "")}{(clipNorm > 0 ? "-clip" : "")}", spec with { Workers = workers });
            Assert.Equal(expected, status.Epochs[^1].ParameterSha256);
            Assert.Equal(shards, status.ShardSilos.Length);
            // Spread by shard number over the three silos.
            Assert.Equal(Math.Min(shards, ClusterFixture.Silos), status.ShardSilos.Distinct().Count());
        }
    }

    /// <summary>A shard attached for incarnation 1 and moved to version 0, with the spec's initial slice.</summary>
    private async Task<(IParameterShardGrain Shard, RunSpec Spec, float[] Initial)> Shard(string runId, int shards = 1, RunSpec? baseSpec = null)
    {
        var spec = (baseSpec ?? Spec(2)) with { ServerShards = shards };
        await StoreRecord(runId, spec, incarnation: 1);
        var shard = fixture.Cluster.Client.GetGrain<IParameterShardGrain>($"{runId}/0");
        var position = await shard.Attach(spec, incarnation: 1, Key);
        Assert.Equal([0L], position.Steps);
        await shard.MoveTo(1, Key, Session, 0);
        var layout = spec.Shards;
        var initial = Backprop.Core.Model.Initializer.Create(spec.Model, spec.Init, spec.Seed)[layout.Start(0)..layout.End(0)];
        Assert.Equal(initial, (await shard.Pull(Session, 0)).Parameters.Span.ToArray());
        return (shard, spec, initial);
    }

    /// <summary>The attach session of the shards these tests drive by hand.</summary>
    private const long Session = 7;
    /// <summary>The coordinator key of the records these tests store by hand.</summary>
    private const long Key = 11;

    private static GradientPush Push(int block, int[] cut, FloatPayload gradient, int incarnation = 1, long step = 0, int samples = 32, long session = Session) =>
        new(incarnation, step, block, cut, samples, EpochLossBefore: 0, BlockLoss: 1.5, gradient, session);

    [Fact]
    public async Task A_step_is_applied_once_when_its_last_block_arrives_and_a_duplicate_changes_nothing()
    {
        var (shard, spec, initial) = await Shard("duplicate-step", shards: 2);
        var gradient = new FloatPayload(Enumerable.Repeat(0.5f, initial.Length).ToArray());
        // Alone, block 0 cannot finish the step: its push answers without a next version once its wait is over
        // (awaited, so that the blocks below certainly find it gathered: calls need not arrive in the order sent).
        var first = await shard.Push(Push(0, [0, 1], gradient));
        Assert.Null(first.Next);
        Assert.Null(first.Divergence);
        // Block 0 again while the step gathers (a redo): kept once. A block of another cut, or of an earlier attach, is refused.
        var firstAgain = shard.Push(Push(0, [0, 1], gradient));
        await Assert.ThrowsAsync<ShardMovedException>(() => shard.Push(Push(0, [0], gradient, samples: 16)));
        await Assert.ThrowsAsync<ShardMovedException>(() => shard.Push(Push(1, [0, 1], gradient, session: Session + 1)));
        var second = await shard.Push(Push(1, [0, 1], gradient));
        var replies = new[] { await firstAgain, second };

        // The optimizer on the slice by hand: the two blocks' sum (1.0 everywhere) over 32 samples.
        float[] expected = (float[])initial.Clone(), state = new float[initial.Length];
        Optimizer.For(spec.Optimizer).Step(0, expected, Enumerable.Repeat(1f, initial.Length).ToArray(), 32, state);
        foreach (var reply in replies)
        {
            Assert.Null(reply.Divergence);
            Assert.Equal(1, reply.Next!.Step);
            Assert.Equal(expected, reply.Next.Parameters.Span.ToArray());
        }
        var again = await shard.Push(Push(0, [0, 1], gradient));
        Assert.Equal(1, again.Next!.Step);
        Assert.Equal(expected, (await shard.Pull(Session, 1)).Parameters.Span.ToArray());

        // A second step reads the momentum the first one left: the state buffers were swapped with the parameters.
        var third = shard.Push(Push(0, [0, 1], gradient, step: 1));
        var fourth = await shard.Push(Push(1, [0, 1], gradient, step: 1));
        float[] twice = (float[])expected.Clone();
        Optimizer.For(spec.Optimizer).Step(1, twice, Enumerable.Repeat(1f, initial.Length).ToArray(), 32, state);
        Assert.Equal(twice, (await third).Next!.Parameters.Span.ToArray());
        Assert.Equal(twice, fourth.Next!.Parameters.Span.ToArray());
        // The version before stays for a redone block (and a rollback); older ones are gone.
        Assert.Equal(expected, (await shard.Pull(Session, 1)).Parameters.Span.ToArray());
        await Assert.ThrowsAsync<ShardMovedException>(() => shard.Pull(Session, 0));
        await shard.MoveTo(1, Key, Session, 1);
        Assert.Equal(expected, (await shard.Pull(Session, 1)).Parameters.Span.ToArray());
        await Assert.ThrowsAsync<ShardMovedException>(() => shard.Pull(Session, 2));
        // Version 0 is the spec's initial slice, whatever the shard holds.
        await shard.MoveTo(1, Key, Session, 0);
        Assert.Equal(initial, (await shard.Pull(Session, 0)).Parameters.Span.ToArray());
        await Assert.ThrowsAsync<ShardMovedException>(() => shard.Pull(Session + 1, 0));

        // A newer coordinator fences the older one off; the shard must be attached before a newer one's blocks count.
        await Assert.ThrowsAsync<ShardMovedException>(() => shard.Push(Push(0, [0], gradient, incarnation: 2)));
        await StoreRecord("duplicate-step", spec, incarnation: 2);
        await shard.Attach(spec, incarnation: 2, Key);
        await Assert.ThrowsAsync<StaleCoordinatorException>(() => shard.Push(Push(0, [0], gradient)));
        await Assert.ThrowsAsync<StaleCoordinatorException>(() => shard.Attach(spec, incarnation: 1, Key));
        await Assert.ThrowsAsync<ArgumentException>(() => shard.Attach(spec with { Seed = 99 }, incarnation: 3, Key));
    }

    [Fact]
    public async Task A_block_of_a_step_two_or_more_behind_is_refused_and_only_the_step_just_applied_gets_the_current_version_back()
    {
        var (shard, spec, initial) = await Shard("stale-step");
        var optimizer = Optimizer.For(spec.Optimizer);
        float[] expected = (float[])initial.Clone(), state = new float[initial.Length * optimizer.StateVectors];
        // Three steps of one block each (a block alone completes its step), with a different gradient each.
        FloatPayload Gradient(long step) => new(Enumerable.Repeat(0.25f * (step + 1), initial.Length).ToArray());
        float[] previous = [];
        for (long step = 0; step < 3; step++)
        {
            var reply = await shard.Push(Push(0, [0], Gradient(step), step: step));
            previous = (float[])expected.Clone();
            optimizer.Step(step, expected, Gradient(step).Span.ToArray(), 32, state);
            Assert.Null(reply.Divergence);
            Assert.Equal(step + 1, reply.Next!.Step);
            Assert.Equal(expected, reply.Next.Parameters.Span.ToArray());
        }

        // The shard is at version 3. A block of step 1 or 0 is left over from a step long gone: refused, not answered with
        // version 3 (which its sender would take for version 2), and nothing changes.
        foreach (long stale in new long[] { 1, 0 })
        {
            var refused = await Assert.ThrowsAsync<ShardMovedException>(() => shard.Push(Push(0, [0], Gradient(stale), step: stale)));
            Assert.Contains($"is at version 3; a block of step {stale} arrived", refused.Message);
        }
        Assert.Equal(expected, (await shard.Pull(Session, 3)).Parameters.Span.ToArray());
        Assert.Equal(previous, (await shard.Pull(Session, 2)).Parameters.Span.ToArray());
        // A redone block of step 2, the step just applied, gets exactly the version that step made.
        var redo = await shard.Push(Push(0, [0], Gradient(2), step: 2));
        Assert.Null(redo.Divergence);
        Assert.Equal(3, redo.Next!.Step);
        Assert.Equal(expected, redo.Next.Parameters.Span.ToArray());

        // And the next step goes on from version 3 and its optimizer state, untouched by the stale blocks.
        var fourth = await shard.Push(Push(0, [0], Gradient(3), step: 3));
        optimizer.Step(3, expected, Gradient(3).Span.ToArray(), 32, state);
        Assert.Equal(4, fourth.Next!.Step);
        Assert.Equal(expected, fourth.Next.Parameters.Span.ToArray());
    }

    [Fact]
    public async Task A_worker_whose_step_is_two_behind_the_shard_counts_no_loss_for_it_and_never_takes_the_shards_version_for_the_next()
    {
        const string runId = "stale-worker";
        var (shard, spec, initial) = await Shard(runId);
        var worker = fixture.Cluster.Client.GetGrain<IWorkerGrain>($"{runId}/1.0/0");
        BlockWork Work(int step) => new(spec, 1, 0, step, step, 0, [0], 0, fixture.DatasetSha256, Session);
        // The worker runs step 0 alone (one block: the whole step) and holds version 1, the version its push brought back.
        var first = await worker.ComputeBlock(Work(0));
        Assert.Single(first.StepLosses);
        // Steps 1 and 2 are applied without it (other workers, as the shard sees it): the shard is at version 3.
        var gradient = new FloatPayload(Enumerable.Repeat(0.5f, initial.Length).ToArray());
        for (long step = 1; step <= 2; step++) Assert.Equal(step + 1, (await shard.Push(Push(0, [0], gradient, step: step))).Next!.Step);

        // Step 1 again on the version 1 it holds (no pull): its push is two steps behind. No loss is counted for it, and
        // version 3 is not taken for version 2 (the shard refuses the block; were it answered, the worker must not adopt it).
        var version3 = (await shard.Pull(Session, 3)).Parameters.Span.ToArray();
        try
        {
            var stale = await worker.ComputeBlock(Work(1));
            Assert.Empty(stale.StepLosses);
        }
        catch (ShardMovedException e)
        {
            Assert.Contains("is at version 3; a block of step 1 arrived", e.Message);
        }
        Assert.Equal(version3, (await shard.Pull(Session, 3)).Parameters.Span.ToArray());

        // A redo of step 2 needs version 2, which the worker does not hold: it pulls it, and takes version 3 from the reply.
        var redo = await worker.ComputeBlock(Work(2));
        Assert.True(redo.Pulled, "the worker computed step 2 on a version it did not pull");
        Assert.Single(redo.StepLosses);
        var next = await worker.ComputeBlock(Work(3));
        Assert.False(next.Pulled, "the worker did not hold version 3 after the redo of step 2");
        Assert.Single(next.StepLosses);
        Assert.Equal(4, (await shard.Pull(Session, 4)).Step);
    }

    [Fact]
    public async Task A_newer_coordinators_fence_counts_only_once_it_is_stored()
    {
        const string runId = "fence-unstored";
        var (shard, spec, initial) = await Shard(runId);
        var gradient = new FloatPayload(Enumerable.Repeat(0.5f, initial.Length).ToArray());
        // The shard's stored fence, one file of the test cluster's file storage.
        string file = Assert.Single(Directory.GetFiles(Path.Combine(fixture.StateDir, "fence"), "*.state"), f => Path.GetFileName(f).Contains(runId));
        byte[] fenceOfIncarnation1 = await File.ReadAllBytesAsync(file);

        // Incarnation 2 is the record's now, but the fence cannot be stored: the file is a later version storage cannot
        // read (a damaged record), so the write's conflict cannot be resolved and the attach fails at once. (A plain I/O
        // failure of the write would be retried for StateWrites.RetryBudget before the attach gave up.)
        await StoreRecord(runId, spec, incarnation: 2);
        await File.WriteAllBytesAsync(file, [.. BitConverter.GetBytes(99L), .. Enumerable.Repeat((byte)0xFF, 16)]);
        var failed = await Assert.ThrowsAsync<OrleansException>(() => shard.Attach(spec, incarnation: 2, Key));
        Assert.Contains($"FileGrainStorage.fence during ReadStateAsync for grain parametershard/{runId}/0", failed.Message);

        // Not fenced in memory either: incarnation 1 still drives the shard (its step is applied), and incarnation 2 is not attached.
        var applied = await shard.Push(Push(0, [0], gradient));
        Assert.Equal(1, applied.Next!.Step);
        Assert.Contains("is not attached to coordinator incarnation 2 yet",
            (await Assert.ThrowsAsync<ShardMovedException>(() => shard.Push(Push(0, [0], gradient, incarnation: 2, step: 1)))).Message);

        // Storage works again: the attach of incarnation 2 is stored, and from then on incarnation 1 is fenced off.
        await File.WriteAllBytesAsync(file, fenceOfIncarnation1);
        await shard.Attach(spec, incarnation: 2, Key);
        Assert.Contains("coordinator incarnation 1 is superseded by 2",
            (await Assert.ThrowsAsync<StaleCoordinatorException>(() => shard.Push(Push(0, [0], gradient, step: 1)))).Message);
        var storage = fixture.Cluster.Silos[0].ServiceProvider.GetRequiredKeyedService<Orleans.Storage.IGrainStorage>(SiloSetup.StorageName);
        var fence = new GrainState<ShardFence>();
        await storage.ReadStateAsync("fence", shard.GetGrainId(), fence);
        Assert.Equal(2, fence.State!.Incarnation);
    }

    [Fact]
    public async Task Blocks_combined_with_their_siblings_as_they_arrive_give_the_bits_of_adding_them_at_the_end()
    {
        // 8 chunks cut into 5 blocks ([0,2) [2,4) [4,6) [6,7) [7,8)); values of very different magnitudes, so that adding
        // in another order than the tree's would change bits. Every arrival order must give the tree's sum, stepped.
        var spec = Spec(5) with { ChunkSize = 8 };
        int[] cut = [0, 2, 4, 6, 7];
        var random = new Random(11);
        int length = checked((int)spec.Model.ParameterCount);
        var sums = Enumerable.Range(0, cut.Length)
            .Select(b => Enumerable.Range(0, length).Select(_ => (float)((random.NextDouble() - 0.5) * Math.Pow(10, random.Next(-4, 5)))).ToArray()).ToArray();
        var gradient = new float[length];
        PairwiseSum.SumNodes(sums.Select(v => (ReadOnlyMemory<float>)v).ToArray(), cut, 8, 0, gradient, new float[PairwiseSum.ScratchFor(length, 8)]);
        var expected = Backprop.Core.Model.Initializer.Create(spec.Model, spec.Init, spec.Seed);
        Optimizer.For(spec.Optimizer).Step(0, expected, gradient, 64, new float[length]);

        // Sent left siblings first, right siblings first, two levels up before the last block (the arrival order is what
        // the silo sees; any must give the same bits).
        int[][] orders = [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 0, 3, 4, 2], [2, 4, 3, 0, 1]];
        for (int o = 0; o < orders.Length; o++)
        {
            var (shard, _, _) = await Shard($"siblings-{o}", baseSpec: spec);
            var pushes = orders[o].Select(b => shard.Push(new GradientPush(1, 0, b, cut, 64, 0, 0.25, new FloatPayload((float[])sums[b].Clone()), Session))).ToArray();
            var replies = await Task.WhenAll(pushes);
            Assert.Contains(replies, r => r.Next is not null);
            Assert.Equal(expected, (await shard.Pull(Session, 1)).Parameters.Span.ToArray());
        }
    }

    [Fact]
    public async Task Blocks_with_bad_sizes_are_refused_before_anything_changes()
    {
        var (shard, spec, initial) = await Shard("bad-steps");
        var ok = new FloatPayload(new float[initial.Length]);
        Assert.Contains("sample count 0", (await Assert.ThrowsAsync<ArgumentException>(() => shard.Push(Push(0, [0], ok, samples: 0)))).Message);
        Assert.Contains("length 3", (await Assert.ThrowsAsync<ArgumentException>(() => shard.Push(Push(0, [0], new FloatPayload(new float[3]))))).Message);
        Assert.Contains("cut into 5 blocks", (await Assert.ThrowsAsync<ArgumentException>(() => shard.Push(Push(0, [0, 1, 2, 3, 4], ok, samples: 64)))).Message);
        // Blocks that are not nodes of the tree over the step's chunks, or do not start at chunk 0.
        Assert.Contains("not nodes of the reduction tree", (await Assert.ThrowsAsync<ArgumentException>(() => shard.Push(Push(0, [0, 3], ok, samples: 64)))).Message);
        Assert.Contains("not nodes of the reduction tree", (await Assert.ThrowsAsync<ArgumentException>(() => shard.Push(Push(0, [2], ok, samples: 64)))).Message);
        Assert.Contains("block 2 of a step cut into 2", (await Assert.ThrowsAsync<ArgumentException>(() => shard.Push(Push(2, [0, 1], ok)))).Message);
        await Assert.ThrowsAsync<ShardMovedException>(() => shard.Push(Push(0, [0], ok, step: 5)));
        Assert.Contains("holds no version 7", (await Assert.ThrowsAsync<ArgumentException>(() => shard.MoveTo(1, Key, Session, 7))).Message);
        Assert.Equal(initial, (await shard.Pull(Session, 0)).Parameters.Span.ToArray());

        var worker = fixture.Cluster.Client.GetGrain<IWorkerGrain>("bad-steps/1.0/0");
        BlockWork Work(int block, int[] cut, int step = 0, string? sha = null, int steps = 1) => new(spec, 1, 0, step, 0, block, cut, 0, sha ?? fixture.DatasetSha256, Session, steps);
        Assert.Contains("differs from the run's", (await Assert.ThrowsAnyAsync<Exception>(() => worker.ComputeBlock(Work(0, [0], sha: "not-the-data")))).Message);
        Assert.Contains("block 7 of a cut into 8", (await Assert.ThrowsAsync<ArgumentException>(() => worker.ComputeBlock(Work(7, [0, 1, 2, 3, 4, 5, 6, 7])))).Message);
        // Not a node of the reduction tree: its sum would not be one the shards can combine in the fixed order.
        Assert.Contains("not an aligned block", (await Assert.ThrowsAsync<ArgumentException>(() => worker.ComputeBlock(Work(1, [0, 1, 3])))).Message);
        Assert.Contains("step 999", (await Assert.ThrowsAsync<ArgumentException>(() => worker.ComputeBlock(Work(0, [0], step: 999)))).Message);
        // A window of steps: at least one, and all within the epoch.
        Assert.Contains("0 steps from step 0", (await Assert.ThrowsAsync<ArgumentException>(() => worker.ComputeBlock(Work(0, [0], steps: 0)))).Message);
        Assert.Contains("are not within the epoch", (await Assert.ThrowsAsync<ArgumentException>(() => worker.ComputeBlock(Work(0, [0], step: 1, steps: int.MaxValue)))).Message);
        Assert.Contains("evaluation range", (await Assert.ThrowsAsync<ArgumentException>(() => worker.Evaluate(new EvalWork(spec, 1, 0, 5, 5_000_000, fixture.DatasetSha256, Session)))).Message);
        Assert.Equal(initial, (await shard.Pull(Session, 0)).Parameters.Span.ToArray());
    }

    /// <summary>The run record as grain storage holds it (the test cluster's silos share one file store).</summary>
    private async Task<(Orleans.Storage.IGrainStorage Storage, GrainId Id, GrainState<RunRecord> Stored)> StoredRecord(string runId)
    {
        var storage = fixture.Cluster.Silos[0].ServiceProvider.GetRequiredKeyedService<Orleans.Storage.IGrainStorage>(SiloSetup.StorageName);
        var id = fixture.Cluster.Client.GetGrain<IRunGrain>(runId).GetGrainId();
        var state = new GrainState<RunRecord>();
        await storage.ReadStateAsync("run", id, state);
        return (storage, id, state);
    }

    private async Task<RunRecord> Record(string runId) => (await StoredRecord(runId)).Stored.State!;

    /// <summary>Changes the stored run record behind its coordinator's back (as a newer coordinator elsewhere would).</summary>
    private async Task<RunRecord> ChangeStoredRecord(string runId, Action<RunRecord> change)
    {
        while (true)
        {
            var (storage, id, stored) = await StoredRecord(runId);
            var record = stored.State!;
            change(record);
            try
            {
                await storage.WriteStateAsync("run", id, stored);
                return record;
            }
            catch (Orleans.Storage.InconsistentStateException)
            {
                // The coordinator wrote in between: read again.
            }
        }
    }

    /// <summary>
    /// Collects activations until the run's answers with <paramref name="epochs"/> epochs done (a fresh one, reading the
    /// changed record): the loop of a run that reads as finished keeps its activation from collection until it has
    /// also updated the run list, a moment later.
    /// </summary>
    private async Task<RunStatus> FreshActivation(IRunGrain run, int epochs)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (true)
        {
            await fixture.Cluster.Client.GetGrain<IManagementGrain>(0).ForceActivationCollection(TimeSpan.Zero);
            var status = await run.GetStatus();
            if (status.EpochsDone == epochs || clock.Elapsed > TimeSpan.FromSeconds(60)) return status;
            await Task.Delay(20);
        }
    }

    /// <summary>
    /// The record a coordinator of <paramref name="incarnation"/> stores before it attaches to the shards (they accept
    /// only that one); no coordinator runs it, so the test drives the shards by hand.
    /// </summary>
    private Task StoreRecord(string runId, RunSpec spec, int incarnation) =>
        ChangeStoredRecord(runId, r => (r.Spec, r.State, r.Incarnation, r.CoordinatorKey) = (spec, RunState.Running, incarnation, Key));

    private static async Task<RunStatus> PollUntil(IRunGrain run, Func<RunStatus, bool> reached)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var status = await run.GetStatus();
        while (!reached(status) && clock.Elapsed < TimeSpan.FromSeconds(120))
        {
            await Task.Delay(5);
            status = await run.GetStatus();
        }
        Assert.True(reached(status), $"run is {status.State}, epoch {status.Epoch + 1} step {status.StepInEpoch}: {status.Error}");
        return status;
    }

    [Fact]
    public async Task A_fenced_coordinator_never_runs_again_nor_writes_the_run_record()
    {
        var spec = Spec(2) with { Epochs = 8, Seed = 21 };
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("fenced");
        await run.Start(spec);
        await PollUntil(run, s => s.EpochsDone >= 1);
        // A newer coordinator (elsewhere) took the run over: the running one meets the record at its next write.
        int newer = (await ChangeStoredRecord("fenced", r => r.Incarnation += 10)).Incarnation;

        // Polled with status calls, which restart a run stored as running whose loop has stopped. The fenced activation
        // must not be the one that does it: its state carries the stored ETag after the conflict, and a loop of its own
        // would claim an incarnation below the newer one and overwrite that coordinator's record.
        var status = await PollUntil(run, s => s.IsFinished);
        Assert.True(status.State == RunState.Completed, $"{status.State}: {status.Error}");
        var stored = await Record("fenced");
        Assert.True(stored.Incarnation > newer, $"stored incarnation {stored.Incarnation}, the newer coordinator's was {newer}");
        Assert.Equal([1, 2, 3, 4, 5, 6, 7, 8], stored.Epochs.Select(e => e.Epoch));
        using var local = new LocalTrainer(spec, fixture.Data.Train);
        for (int e = 0; e < spec.Epochs; e++) local.TrainEpoch(e);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), stored.Epochs[^1].ParameterSha256);
    }

    [Fact]
    public async Task A_run_whose_epoch_results_are_missing_fails_loudly_instead_of_completing_with_fewer()
    {
        var spec = Spec(2) with { Epochs = 3, Seed = 22 };
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("missing-epochs");
        await run.Start(spec);
        Assert.Equal(RunState.Completed, (await PollUntil(run, s => s.IsFinished)).State);
        // The record loses two epochs' results (a damaged or foreign store) while no activation holds it; only the last
        // epoch's result could be evaluated again from the parameters the shards hold.
        await ChangeStoredRecord("missing-epochs", r => { r.Epochs.RemoveRange(0, 2); r.State = RunState.Cancelled; });
        Assert.Equal(1, (await FreshActivation(run, epochs: 1)).EpochsDone);   // reading the changed record

        await run.Resume();
        var status = await PollUntil(run, s => s.IsFinished);
        Assert.Equal(RunState.Failed, status.State);
        Assert.Contains("epoch results are stored", status.Error);
    }

    [Fact]
    public async Task The_result_of_an_epoch_whose_training_ended_is_evaluated_again_on_resume()
    {
        var spec = Spec(2) with { Epochs = 2, Seed = 23 };
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("last-epoch-lost");
        await run.Start(spec);
        var done = await PollUntil(run, s => s.IsFinished);
        Assert.Equal(RunState.Completed, done.State);
        // Stopped between the shards' epoch-end checkpoint and the record's update of the last epoch.
        await ChangeStoredRecord("last-epoch-lost", r => { r.Epochs.RemoveAt(1); r.State = RunState.Cancelled; });
        Assert.Equal(1, (await FreshActivation(run, epochs: 1)).EpochsDone);   // reading the changed record

        await run.Resume();
        var status = await PollUntil(run, s => s.IsFinished);
        Assert.True(status.State == RunState.Completed, $"{status.State}: {status.Error}");
        var stored = await Record("last-epoch-lost");
        Assert.Equal([1, 2], stored.Epochs.Select(e => e.Epoch));
        Assert.Equal(done.Epochs[1].ParameterSha256, stored.Epochs[1].ParameterSha256);
        Assert.Equal(done.Epochs[1].TestAccuracy, stored.Epochs[1].TestAccuracy);
    }

    [Fact]
    public async Task An_adam_run_stopped_mid_epoch_resumes_from_its_checkpoint_to_the_same_bits_and_refuses_a_changed_optimizer()
    {
        // 19 steps an epoch, 76 in all; the step schedule halves the rate after each epoch, Adam's moments live in the shards' checkpoints.
        var spec = Spec(2) with
        {
            Epochs = 4, Seed = 24, CheckpointEvery = 4, ServerShards = 2,
            Optimizer = new OptimizerSettings(OptimizerKind.Adam, 1e-3f, 0, Beta2: 0.99, Schedule: ScheduleKind.Step, LrStepEpochs: 1, LrGamma: 0.5),
        };
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("adam-resume");
        await run.Start(spec);
        await PollUntil(run, s => s.Step >= 20 || s.IsFinished);
        await run.Cancel();
        var stopped = await PollUntil(run, s => s.IsFinished);
        Assert.True(stopped.State == RunState.Cancelled, $"the run ended {stopped.State} before it was cancelled");
        Assert.Equal(19, stopped.Spec!.StepsPerEpoch);   // resolved at the start, for the shards

        // The same spec again is the same run; another optimizer setting is another run.
        Assert.Equal(RunState.Cancelled, (await run.Start(spec)).State);
        var changed = spec with { Optimizer = spec.Optimizer with { Beta2 = 0.999 } };
        Assert.Contains("already used by another run", (await Assert.ThrowsAsync<ArgumentException>(() => run.Start(changed))).Message);
        Assert.Contains("already used by another run", (await Assert.ThrowsAsync<ArgumentException>(() =>
            run.Start(spec with { Optimizer = spec.Optimizer with { LrGamma = 0.3 } }))).Message);

        // The record says cancelled a moment before the stopped loop has ended: a resume meanwhile waits for it, then resumes.
        Assert.Equal(RunState.Running, (await run.Resume()).State);
        var status = await PollUntil(run, s => s.IsFinished);
        Assert.True(status.State == RunState.Completed, $"{status.State}: {status.Error}");
        var resumed = Assert.Single(status.Events, e => e.Kind == "resumed");
        Assert.Matches(@"continued from step (\d+)", resumed.Message);
        long from = long.Parse(System.Text.RegularExpressions.Regex.Match(resumed.Message, @"continued from step (\d+)").Groups[1].Value);
        Assert.InRange(from, 1, 75);
        using var local = new LocalTrainer(spec, fixture.Data.Train);
        for (int e = 0; e < spec.Epochs; e++) local.TrainEpoch(e);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), status.Epochs[^1].ParameterSha256);
        Assert.Equal([1, 0.5, 0.25, 0.125], status.Epochs.Select(e => status.Spec!.EpochLearningRate(e.Epoch) / 1e-3f));
    }

    [Fact]
    public async Task A_huge_learning_rate_stops_the_run_as_diverged_with_the_step()
    {
        var spec = Spec(2) with { Optimizer = Spec(2).Optimizer with { LearningRate = 1e30f } };
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("diverge");
        var status = await run.Start(spec);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (!status.IsFinished && clock.Elapsed < TimeSpan.FromSeconds(50))
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.Equal(RunState.Diverged, status.State);
        Assert.Matches(@"^diverged at step \d+ \(epoch 1\): ", status.Error);
        Assert.Empty(status.Epochs);
    }
    /// <summary>
    /// A clipped run whose step 0 sits on a rounding edge: its tiles' squared sums added as one run (LocalTrainer) and as
    /// a subtotal per shard give scales one float apart. Shard 0 must add every shard's tiles as one run.
    /// </summary>
    [Fact]
    public async Task A_clipped_run_on_a_rounding_edge_of_the_norm_has_the_bits_of_a_single_process_on_three_shards()
    {
        var spec = Presets.PyTorchMlp with { Epochs = 1, Seed = 12, Workers = 1, ServerShards = 3, ClipNorm = 0.09998999008823672 };
        // The edge: step 0's gradient, its norm as one run of tiles and as three subtotals.
        using (var gradient = new StepGradient(spec.Model, spec.ChunkSize, spec.ChunksPerStep, threads: 1))
        {
            var plan = new EpochPlan(fixture.Data.Train.Count, spec.BatchSize, spec.ChunkSize, spec.Seed, epoch: 0);
            gradient.SumBlock(fixture.Data.Train, plan, 0, 0, plan.ChunkCount(0), Backprop.Core.Model.Initializer.Create(spec.Model, spec.Init, spec.Seed));
            var sum = gradient.Result.ToArray();
            var layout = spec.Shards;
            var parts = Enumerable.Range(0, 3).Select(j =>
            {
                var tiles = new double[GradientClip.Tiles(layout.Length(j))];
                GradientClip.SquaredSums(sum.AsSpan(layout.Start(j), layout.Length(j)), tiles);
                return tiles;
            }).ToArray();
            double subtotals = parts.Sum(p => GradientClip.Total(p));
            Assert.NotEqual(GradientClip.Scale(subtotals, plan.StepSize(0), spec.ClipNorm), GradientClip.Scale(GradientClip.Total(parts), plan.StepSize(0), spec.ClipNorm));
        }
        using var local = new LocalTrainer(spec, fixture.Data.Train);
        local.TrainEpoch(0);
        var status = await RunToEnd("clip-edge", spec);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), status.Epochs[^1].ParameterSha256);
    }

    /// <summary>Two shards of a clipped run attached by hand (incarnation 1, <see cref="Session"/>) at version 0.</summary>
    private async Task<(IParameterShardGrain Zero, IParameterShardGrain One, RunSpec Spec)> ClippedShards(string runId)
    {
        var spec = Spec(2) with { ServerShards = 2, ClipNorm = 0.05 };
        await StoreRecord(runId, spec, incarnation: 1);
        var zero = fixture.Cluster.Client.GetGrain<IParameterShardGrain>($"{runId}/0");
        var one = fixture.Cluster.Client.GetGrain<IParameterShardGrain>($"{runId}/1");
        await Task.WhenAll(zero.Attach(spec, 1, Key), one.Attach(spec, 1, Key));
        await Task.WhenAll(zero.MoveTo(1, Key, Session, 0), one.MoveTo(1, Key, Session, 0));
        return (zero, one, spec);
    }

    private static FloatPayload Filled(RunSpec spec, int shard, float value) => new(Enumerable.Repeat(value, spec.Shards.Length(shard)).ToArray());

    [Fact]
    public async Task Bad_norm_parts_are_refused_and_change_nothing_of_the_clipped_step()
    {
        var (zero, one, spec) = await ClippedShards("clip-bad-parts");
        var (cleanZero, cleanOne, _) = await ClippedShards("clip-clean-parts");
        int tiles = GradientClip.Tiles(spec.Shards.Length(1));
        NormPart Part(int shard = 1, double[]? sums = null, long step = 0, long session = Session, int incarnation = 1) =>
            new(incarnation, session, step, shard, sums ?? Enumerable.Repeat(1.0, tiles).ToArray());

        // Shard 1 has its block: it waits at shard 0, which has none yet.
        var pushOne = one.Push(Push(0, [0], Filled(spec, 1, 0.5f)));
        var cleanPushOne = cleanOne.Push(Push(0, [0], Filled(spec, 1, 0.5f)));
        Assert.Contains("tile sums", (await Assert.ThrowsAsync<ArgumentException>(() => zero.GradientNorm(Part(sums: new double[tiles - 1])))).Message);
        Assert.Contains("negative", (await Assert.ThrowsAsync<ArgumentException>(() => zero.GradientNorm(Part(sums: Enumerable.Repeat(-1.0, tiles).ToArray())))).Message);
        Assert.Contains("other shards are 1..1", (await Assert.ThrowsAsync<ArgumentException>(() => zero.GradientNorm(Part(shard: 0)))).Message);
        Assert.Contains("other shards are 1..1", (await Assert.ThrowsAsync<ArgumentException>(() => zero.GradientNorm(Part(shard: 2)))).Message);
        Assert.Contains("is not shard 0", (await Assert.ThrowsAsync<ArgumentException>(() => one.GradientNorm(Part()))).Message);
        await Assert.ThrowsAsync<ShardMovedException>(() => zero.GradientNorm(Part(session: Session + 1)));
        await Assert.ThrowsAsync<ShardMovedException>(() => zero.GradientNorm(Part(step: 5)));
        await Assert.ThrowsAsync<ShardMovedException>(() => zero.GradientNorm(Part(incarnation: 2)));
        await Assert.ThrowsAsync<StaleCoordinatorException>(() => zero.GradientNorm(Part(incarnation: 0)));
        // An unclipped run has no norm to add up.
        var (plain, _, _) = await Shard("clip-none-parts", shards: 2);
        Assert.Contains("does not clip", (await Assert.ThrowsAsync<ArgumentException>(() => plain.GradientNorm(Part()))).Message);

        // Shard 0's block completes the step on both shards, as on the pair no bad part was sent to.
        var replies = await Task.WhenAll(zero.Push(Push(0, [0], Filled(spec, 0, 0.5f))), pushOne);
        var clean = await Task.WhenAll(cleanZero.Push(Push(0, [0], Filled(spec, 0, 0.5f))), cleanPushOne);
        Assert.All(replies.Concat(clean), r => Assert.Equal(1, r.Next!.Step));
        for (int j = 0; j < 2; j++) Assert.Equal(clean[j].Next!.Parameters.Span.ToArray(), replies[j].Next!.Parameters.Span.ToArray());
        // The clip bound took effect: a mean gradient of 0.5/32 everywhere has a norm of 5.2, clipped to 0.05, and the first
        // momentum step moves θ by lr·g: 0.01 · 0.05 (to float rounding).
        var initial = Backprop.Core.Model.Initializer.Create(spec.Model, spec.Init, spec.Seed);
        var moved = replies.SelectMany((r, j) => r.Next!.Parameters.Span.ToArray().Select((p, i) => (double)p - initial[spec.Shards.Start(j) + i])).ToArray();
        Assert.Equal(0.01 * 0.05, Math.Sqrt(moved.Sum(d => d * d)), 0.01 * 0.05 * 1e-3);
    }

    [Fact]
    public async Task A_non_finite_gradient_on_one_shard_of_a_clipped_run_makes_every_shard_refuse_the_step()
    {
        var (zero, one, spec) = await ClippedShards("clip-non-finite");
        var replies = await Task.WhenAll(zero.Push(Push(0, [0], Filled(spec, 0, 0.5f))), one.Push(Push(0, [0], Filled(spec, 1, float.PositiveInfinity))));
        Assert.All(replies, r => Assert.Equal("the gradient has non-finite values", r.Divergence));
        Assert.All(replies, r => Assert.Null(r.Next));
    }
}
