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
        var server = fixture.Cluster.Client.GetGrain<IParameterServerGrain>("overflow-direct");
        await Assert.ThrowsAsync<ArgumentException>(() => server.Attach(overflow, 1));
        var version = new ParameterVersion(0, new FloatPayload(new float[10]));
        var worker = fixture.Cluster.Client.GetGrain<IWorkerGrain>("overflow-direct/0");
        await Assert.ThrowsAsync<ArgumentException>(() => worker.ComputeBlock(new BlockWork(overflow, 0, 0, 0, 1, version, fixture.DatasetSha256)));

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

    [Fact]
    public async Task A_duplicate_step_returns_the_same_version_and_changes_nothing()
    {
        var spec = Spec(2);
        var server = fixture.Cluster.Client.GetGrain<IParameterServerGrain>("duplicate-step");
        var start = await server.Attach(spec, incarnation: 1);
        Assert.Equal(0, start.Version.Step);
        var gradient = new FloatPayload(Enumerable.Repeat(0.5f, start.Version.Parameters.Length).ToArray());
        var update = new StepUpdate(1, 0, [gradient, gradient], [0, 1], 32, 1.5);

        var first = await server.ApplyStep(update);
        var again = await server.ApplyStep(update);

        Assert.Null(first.Divergence);
        Assert.Equal(1, first.Version.Step);
        Assert.Equal(1, again.Version.Step);
        Assert.Equal(ParameterHash.Sha256(first.Version.Parameters.Span), ParameterHash.Sha256(again.Version.Parameters.Span));
        Assert.Equal(ParameterHash.Sha256(first.Version.Parameters.Span), ParameterHash.Sha256((await server.GetParameters()).Parameters.Span));
        Assert.NotEqual(ParameterHash.Sha256(start.Version.Parameters.Span), ParameterHash.Sha256(first.Version.Parameters.Span));

        // A newer coordinator fences the older one off.
        await server.Attach(spec, incarnation: 2);
        await Assert.ThrowsAsync<StaleCoordinatorException>(() => server.ApplyStep(update with { Step = 1 }));
    }

    [Fact]
    public async Task Steps_with_bad_sizes_are_refused_before_anything_changes()
    {
        var spec = Spec(2);
        var server = fixture.Cluster.Client.GetGrain<IParameterServerGrain>("bad-steps");
        var start = await server.Attach(spec, incarnation: 1);
        var ok = new FloatPayload(new float[start.Version.Parameters.Length]);
        var e1 = await Assert.ThrowsAsync<ArgumentException>(() => server.ApplyStep(new StepUpdate(1, 0, [ok], [0], 0, 0)));
        Assert.Contains("sample count 0", e1.Message);
        var e2 = await Assert.ThrowsAsync<ArgumentException>(() => server.ApplyStep(new StepUpdate(1, 0, [new FloatPayload(new float[3])], [0], 10, 0)));
        Assert.Contains("length 3", e2.Message);
        var e3 = await Assert.ThrowsAsync<ArgumentException>(() => server.ApplyStep(new StepUpdate(1, 0, [ok, ok, ok, ok, ok], [0, 1, 2, 3, 4], 10, 0)));
        Assert.Contains("1..4 block sums", e3.Message);
        // Blocks that are not nodes of the tree over the step's chunks, or do not start at chunk 0.
        var e4 = await Assert.ThrowsAsync<ArgumentException>(() => server.ApplyStep(new StepUpdate(1, 0, [ok, ok], [0, 3], 64, 0)));
        Assert.Contains("not nodes of the reduction tree", e4.Message);
        var e5 = await Assert.ThrowsAsync<ArgumentException>(() => server.ApplyStep(new StepUpdate(1, 0, [ok], [2], 64, 0)));
        Assert.Contains("not nodes of the reduction tree", e5.Message);
        Assert.Equal(0, (await server.GetParameters()).Step);

        var worker = fixture.Cluster.Client.GetGrain<IWorkerGrain>("bad-steps/0");
        var version = start.Version;
        Assert.Contains("differs from the run's", (await Assert.ThrowsAnyAsync<Exception>(() => worker.ComputeBlock(new BlockWork(spec, 0, 0, 0, 1, version, "not-the-data")))).Message);
        Assert.Contains("chunks [7, 8)", (await Assert.ThrowsAsync<ArgumentException>(() => worker.ComputeBlock(new BlockWork(spec, 0, 0, 7, 8, version, fixture.DatasetSha256)))).Message);
        // Not a node of the reduction tree: its sum would not be one the server can combine in the fixed order.
        Assert.Contains("not an aligned block", (await Assert.ThrowsAsync<ArgumentException>(() => worker.ComputeBlock(new BlockWork(spec, 0, 0, 1, 3, version, fixture.DatasetSha256)))).Message);
        Assert.Contains("step 999", (await Assert.ThrowsAsync<ArgumentException>(() => worker.ComputeBlock(new BlockWork(spec, 0, 999, 0, 1, version, fixture.DatasetSha256)))).Message);
        Assert.Contains("evaluation range", (await Assert.ThrowsAsync<ArgumentException>(() => worker.Evaluate(new EvalWork(spec, 5, 5_000_000, version.Parameters, fixture.DatasetSha256)))).Message);
    }

    [Fact]
    public async Task A_group_whose_workers_are_not_distinct_others_is_refused_before_any_call()
    {
        var spec = Spec(2);
        var server = fixture.Cluster.Client.GetGrain<IParameterServerGrain>("bad-group");
        var version = (await server.Attach(spec, incarnation: 1)).Version;
        var lead = fixture.Cluster.Client.GetGrain<IWorkerGrain>("bad-group/0");
        var other = fixture.Cluster.Client.GetGrain<IWorkerGrain>("bad-group/1");
        var block = new BlockWork(spec, 0, 0, 0, 1, version, fixture.DatasetSha256);
        BlockWork[] two = [block, block with { FirstChunk = 1, EndChunk = 2 }];
        // A member that is the lead itself would be a call to its own busy activation: it would hang until the
        // response timeout instead of failing; a null member was a NullReferenceException (retried as transient).
        foreach (var workers in new[] { new[] { lead, lead }, [lead, null!], [other, lead] })
        {
            var refused = await Assert.ThrowsAsync<ArgumentException>(() => lead.ComputeBlocks(new BlockGroupWork(two, workers)));
            Assert.Contains("group", refused.Message);
        }
        BlockWork[] three = [.. two, block with { FirstChunk = 2, EndChunk = 3 }];
        var repeated = await Assert.ThrowsAsync<ArgumentException>(() => lead.ComputeBlocks(new BlockGroupWork(three, [lead, other, other])));
        Assert.Contains("repeated", repeated.Message);
        // A well-formed group still computes.
        var sums = await lead.ComputeBlocks(new BlockGroupWork(two, [lead, other]));
        Assert.Equal([0, 1], sums.Select(s => s.FirstChunk).ToArray());
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
}
