using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using Backprop.Core;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using Backprop.Grains;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Microsoft.Extensions.DependencyInjection;

namespace Backprop.Tests.Cluster;

/// <summary>
/// The data lanes of the three in-process silos (each listens on 127.0.0.1): a worker's pushes and pulls to a shard
/// on another silo go through them, with the same bits, and they fail safe (a broken connection redoes steps, an
/// unreachable lane falls back to Orleans, a bad frame closes only its connection).
/// </summary>
[Collection("cluster")]
public sealed class DataLaneTests(ClusterFixture fixture)
{
    private static RunSpec Spec(int workers, int shards, int epochs = 1) =>
        Presets.PyTorchMlp with { Epochs = epochs, Workers = workers, Seed = 17, ServerShards = shards };

    private DataLane[] Lanes => fixture.Cluster.Silos.Select(s => s.ServiceProvider.GetRequiredService<DataLane>()).ToArray();

    private async Task<RunStatus> RunToEnd(string runId, RunSpec spec, Func<Task>? whileRunning = null)
    {
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>(runId);
        var status = await run.Start(spec);
        if (whileRunning is not null) await whileRunning();
        var deadline = DateTime.UtcNow.AddSeconds(90);
        while (!status.IsFinished && DateTime.UtcNow < deadline)
            status = await run.WaitForFinish(TimeSpan.FromSeconds(5));
        Assert.True(status.State == RunState.Completed, $"run {runId} ended {status.State}: {status.Error}");
        return status;
    }

    private string Expected(RunSpec spec)
    {
        using var local = new LocalTrainer(spec, fixture.Data.Train);
        for (int epoch = 0; epoch < spec.Epochs; epoch++) local.TrainEpoch(epoch);
        return ParameterHash.Sha256(local.Parameters);
    }

    [Fact]
    public async Task Every_silo_listens_on_its_own_address_and_shards_on_other_silos_are_reached_through_the_lanes_with_the_same_bits()
    {
        foreach (var (silo, lane) in fixture.Cluster.Silos.Zip(Lanes))
            Assert.Equal(silo.SiloAddress.Endpoint.Address, IPEndPoint.Parse(lane.Endpoint!).Address);
        var spec = Spec(workers: 3, shards: 3);
        // Every pair dialled first: a lane another test left backing off would carry nothing of this short run.
        foreach (var from in Lanes)
            foreach (var to in Lanes.Where(l => l != from))
                Assert.True(await from.DialForTests(to.Endpoint!));
        long servedBefore = Lanes.Sum(l => l.Served), calledBefore = Lanes.Sum(l => l.Called), earlyBefore = BackpropMetrics.EarlyPushes;
        var metricsBefore = BackpropMetrics.LaneTotals;

        var status = await RunToEnd("lane-bits", spec);

        Assert.Equal(Expected(spec), status.Epochs[^1].ParameterSha256);
        long served = Lanes.Sum(l => l.Served) - servedBefore, called = Lanes.Sum(l => l.Called) - calledBefore;
        // Every worker pushes to the two shards on other silos, through their lanes once a reply named them and the
        // lane is dialled (meanwhile through Orleans): most of the 19 steps' pushes.
        long steps = status.Epochs[^1].Steps;
        Assert.True(served >= 3 * 2 * steps / 2, $"{served} requests served by the lanes for {steps} steps of 3 workers and 3 shards");
        // Every call sent was answered (bounds, not equality: a run of another test may still be winding down).
        Assert.True(called >= 3 * 2 * steps / 2, $"{called} requests sent through the lanes for {steps} steps");
        // Once a shard's reply named its lane, a worker sends its slice as soon as the backprop threads wrote it, while
        // the rest of the step is computed (its last chunk writes the sum range by range).
        long early = BackpropMetrics.EarlyPushes - earlyBefore;
        Assert.True(early >= 3 * 2 * steps / 2, $"{early} pushes sent early for {steps} steps of 3 workers and 3 shards");
        // And counted on /metrics (backprop.lane.calls, both directions: every silo of the cluster is in this process).
        var metrics = BackpropMetrics.LaneTotals;
        Assert.True(metrics.Served - metricsBefore.Served >= served && metrics.Sent - metricsBefore.Sent >= called,
            $"metrics counted {metrics.Served - metricsBefore.Served} served and {metrics.Sent - metricsBefore.Sent} sent, the lanes {served} and {called}");
        // Every request's bytes went back to its lane's budget (the shard released the gradient, or the call ended).
        Assert.All(Lanes, l => Assert.Equal(DataLane.BudgetBytes, l.BudgetFreeForTests));
        // The answers are read on the thread pool: a reader on the dialling worker's activation scheduler would wait
        // out that worker's synchronous compute before any other worker on its silo got its reply.
        Assert.Equal(["ThreadPoolTaskScheduler"], LaneConnection.ReaderSchedulers.Keys.ToArray());
    }

    [Fact]
    public async Task Breaking_every_lane_connection_mid_run_redoes_the_steps_and_ends_with_the_same_bits()
    {
        var spec = Spec(workers: 3, shards: 3, epochs: 3);
        var run = fixture.Cluster.Client.GetGrain<IRunGrain>("lane-broken");
        long servedBefore = Lanes.Sum(l => l.Served);
        long servedAtBreak = 0;
        int breaks = 0;
        var status = await RunToEnd("lane-broken", spec, async () =>
        {
            // Polls the lanes' counters and the run's events (not a sleep): breaks the lanes once pushes go through
            // them, again until a break caught a worker's window mid-push (its call failed: "worker-failed").
            var deadline = DateTime.UtcNow.AddSeconds(60);
            while (DateTime.UtcNow < deadline)
            {
                long served = Lanes.Sum(l => l.Served);
                if (served - servedBefore >= 20 && served > servedAtBreak)
                {
                    servedAtBreak = served;
                    breaks++;
                    foreach (var lane in Lanes) lane.BreakConnectionsForTests();
                }
                var now = await run.GetStatus();
                if (now.IsFinished || now.Events.Any(e => e.Kind == "worker-failed")) return;
                await Task.Delay(5);
            }
        });

        Assert.True(breaks > 0, "the run ended before its pushes went through the lanes");
        Assert.Contains(status.Events, e => e.Kind == "worker-failed" && e.Message.Contains("data lane"));
        Assert.Equal(Expected(spec), status.Epochs[^1].ParameterSha256);
        // The lanes work again: every pair dials (a lane cut with calls waiting backs off first) and answers a call (the
        // shard's own exception, through the lane: a call through Orleans would throw the fallback's).
        foreach (var from in Lanes)
            foreach (var to in Lanes.Where(l => l != from))
            {
                Assert.True(await from.DialForTests(to.Endpoint!));
                await Assert.ThrowsAsync<ShardMovedException>(() =>
                    from.Pull(to.Endpoint!, "lane-broken-after/0", 1, 0, () => throw new InvalidOperationException("went through Orleans")));
            }
    }

    [Fact]
    public async Task A_shard_error_comes_back_through_the_lane_as_the_grain_calls_exception()
    {
        var (from, to) = (Lanes[0], Lanes[1]);
        Assert.True(await from.DialForTests(to.Endpoint!));
        var error = await Assert.ThrowsAsync<ShardMovedException>(() =>
            from.Pull(to.Endpoint!, "lane-no-such-run/0", session: 1, step: 0, () => throw new InvalidOperationException("went through Orleans")));
        Assert.Contains("shard", error.Message);
    }

    [Fact]
    public async Task A_lane_that_cannot_be_dialled_leaves_the_call_to_orleans()
    {
        using var closed = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        closed.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        string nobody = closed.LocalEndPoint!.ToString()!;   // bound, never listening: connections are refused
        // Any lane's first call goes through Orleans while it is dialled: this checks a call after the dial failed.
        Assert.False(await Lanes[0].DialForTests(nobody));
        bool viaOrleans = false;
        var version = await Lanes[0].Pull(nobody, "lane-fallback/0", 1, 0, () =>
        {
            viaOrleans = true;
            return Task.FromResult(new ParameterVersion(0, new FloatPayload([1f, 2f])));
        });
        Assert.True(viaOrleans);
        Assert.True(BackpropMetrics.LaneTotals.Fallbacks > 0);
        Assert.Equal([1f, 2f], version.Parameters.Span.ToArray());
    }

    [Fact]
    public async Task A_dialler_the_lane_does_not_greet_falls_back_to_orleans_and_does_not_dial_again_at_once()
    {
        // A listener that accepts and closes without the greeting byte, as a lane does for an address it refuses.
        using var refusing = new FakeLane(greets: false);
        Assert.False(await Lanes[0].DialForTests(refusing.Endpoint));
        await GoesThroughOrleansWithoutDialling(refusing);
    }

    [Fact]
    public async Task A_lane_that_greets_and_then_drops_the_connection_is_passed_over_instead_of_redialled_at_once()
    {
        // A peer that accepts, greets and closes at once (as one that drops every frame of a version it cannot read).
        using var dropping = new FakeLane(greets: true);
        await Lanes[0].DialForTests(dropping.Endpoint);
        // The connection is made, then closed by the peer: polled until its reader saw the end.
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (Lanes[0].StateForTests(dropping.Endpoint).Open && DateTime.UtcNow < deadline) await Task.Delay(5);
        Assert.False(Lanes[0].StateForTests(dropping.Endpoint).Open);
        // Short-lived without an answer: a failure like a refused dial.
        await GoesThroughOrleansWithoutDialling(dropping);
    }

    /// <summary>Three calls to <paramref name="lane"/> right after its failure go through Orleans, and the lane, backing off, dials no more.</summary>
    private async Task GoesThroughOrleansWithoutDialling(FakeLane lane)
    {
        for (int i = 0; i < 3; i++)
        {
            bool viaOrleans = false;
            await Lanes[0].Pull(lane.Endpoint, "lane-fake/0", 1, 0, () =>
            {
                viaOrleans = true;
                return Task.FromResult(new ParameterVersion(0, new FloatPayload([1f])));
            });
            Assert.True(viaOrleans);
        }
        Assert.True(Lanes[0].StateForTests(lane.Endpoint).BackingOff);
        Assert.Equal(1, lane.Accepted);
    }

    /// <summary>
    /// A listener (on 127.0.0.1 unless told) that accepts every connection, counts it, greets it or not, and closes it at
    /// once, or, when it <paramref name="holds"/> them, when it is disposed.
    /// </summary>
    private sealed class FakeLane : IDisposable
    {
        private readonly Socket _listener = new(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        private readonly System.Collections.Concurrent.ConcurrentBag<Socket> _held = [];
        private int _accepted;

        public FakeLane(bool greets, IPAddress? address = null, bool holds = false)
        {
            _listener.Bind(new IPEndPoint(address ?? IPAddress.Loopback, 0));
            _listener.Listen();
            Endpoint = _listener.LocalEndPoint!.ToString()!;
            _ = Task.Run(async () =>
            {
                while (true)
                {
                    Socket s;
                    try { s = await _listener.AcceptAsync(); } catch { return; }
                    Interlocked.Increment(ref _accepted);
                    if (greets) await s.SendAsync(new[] { DataLane.Accepted });
                    if (holds) _held.Add(s);
                    else s.Dispose();
                }
            });
        }

        public string Endpoint { get; } = "";
        public int Accepted => Volatile.Read(ref _accepted);

        /// <summary>Whether the dialler closed every connection held here: each reads its end within 30 s.</summary>
        public async Task<bool> AllClosedByDialler()
        {
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            var buffer = new byte[64];
            foreach (var s in _held)
                while (true)
                {
                    int read;
                    try { read = await s.ReceiveAsync(buffer, SocketFlags.None, timeout.Token); } catch (OperationCanceledException) { return false; }
                    if (read == 0) break;
                }
            return !_held.IsEmpty;
        }

        public void Dispose()
        {
            _listener.Dispose();
            foreach (var s in _held) s.Dispose();
        }
    }

    [Fact]
    public async Task Lanes_of_a_silo_declared_dead_are_closed_and_forgotten_and_ended_lanes_of_no_silo_too()
    {
        var lane = Lanes[0];
        var membership = fixture.Cluster.Silos[0].ServiceProvider.GetRequiredService<IClusterMembershipService>();
        var now = membership.CurrentSnapshot;

        // An open lane at an address where no silo is known (127.0.0.2) stays while it is open, and goes once it ended.
        using (var unknown = new FakeLane(greets: true, IPAddress.Parse("127.0.0.2"), holds: true))
        {
            Assert.True(await lane.DialForTests(unknown.Endpoint));
            lane.Forget(now);
            Assert.True(lane.KnowsForTests(unknown.Endpoint));
            Assert.True(lane.StateForTests(unknown.Endpoint).Open);
            unknown.Dispose();
            var deadline = DateTime.UtcNow.AddSeconds(30);
            while (lane.StateForTests(unknown.Endpoint).Open && DateTime.UtcNow < deadline) await Task.Delay(5);
            Assert.False(lane.StateForTests(unknown.Endpoint).Open);
            lane.Forget(now);
            Assert.False(lane.KnowsForTests(unknown.Endpoint));
        }

        // An open lane at the address of a silo the membership declares dead is closed and forgotten at once; one at
        // the address of a live silo (the cluster's lanes, 127.0.0.1) is kept, open.
        using var died = new FakeLane(greets: true, IPAddress.Parse("127.0.0.3"), holds: true);
        Assert.True(await lane.DialForTests(died.Endpoint));
        Assert.True(await lane.DialForTests(Lanes[1].Endpoint!));
        var ghost = SiloAddress.New(IPAddress.Parse("127.0.0.3"), 11111, 1);
        var withDead = new ClusterMembershipSnapshot(now.Members.Add(ghost, new ClusterMember(ghost, SiloStatus.Dead, "ghost")),
            new MembershipVersion(now.Version.Value + 1));
        lane.Forget(withDead);
        Assert.False(lane.KnowsForTests(died.Endpoint));
        Assert.True(await died.AllClosedByDialler());
        Assert.True(lane.StateForTests(Lanes[1].Endpoint!).Open);
        // What the worker sees: the next call to the forgotten lane goes through Orleans while it is dialled again.
        bool viaOrleans = false;
        await lane.Pull(died.Endpoint, "lane-died/0", 1, 0, () =>
        {
            viaOrleans = true;
            return Task.FromResult(new ParameterVersion(0, new FloatPayload([1f])));
        });
        Assert.True(viaOrleans);
    }

    [Theory]
    [InlineData(1, 1u << 30, 0u)]                // a header over the limit
    [InlineData(1, 8u, 3u)]                      // a payload that is not a float vector
    [InlineData(1, 8u, (64u << 20) + 4)]         // a payload over the message cap
    [InlineData(9, 0u, 0u)]                      // no such request
    public async Task A_frame_out_of_bounds_closes_only_its_connection(byte kind, uint headerBytes, uint payloadBytes)
    {
        var lane = IPEndPoint.Parse(Lanes[1].Endpoint!);
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(lane);
        // From 127.0.0.1, a silo's address: accepted.
        var greeting = new byte[1];
        Assert.Equal(1, await socket.ReceiveAsync(greeting));
        Assert.Equal(DataLane.Accepted, greeting[0]);
        // The prefix (kind, request id, header and payload byte counts) and, where it is small, a header of zeros, in one send.
        var frame = new byte[17 + (headerBytes < 1024 ? headerBytes : 0)];
        frame[0] = kind;
        BinaryPrimitives.WriteInt64LittleEndian(frame.AsSpan(1), 1);
        BinaryPrimitives.WriteUInt32LittleEndian(frame.AsSpan(9), headerBytes);
        BinaryPrimitives.WriteUInt32LittleEndian(frame.AsSpan(13), payloadBytes);
        await socket.SendAsync(frame);

        // The lane closes the connection without answering: a read ends the stream (0 bytes), or is reset where the
        // lane closed with bytes of ours still unread.
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        try
        {
            Assert.Equal(0, await socket.ReceiveAsync(new byte[64], SocketFlags.None, timeout.Token));
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
        }

        // Nothing of the bad frame stays taken from the budget.
        Assert.Equal(DataLane.BudgetBytes, Lanes[1].BudgetFreeForTests);
        // Another connection is still served.
        Assert.True(await Lanes[0].DialForTests(Lanes[1].Endpoint!));
        await Assert.ThrowsAsync<ShardMovedException>(() =>
            Lanes[0].Pull(Lanes[1].Endpoint!, "lane-after-bad-frame/0", 1, 0, () => throw new InvalidOperationException("went through Orleans")));
    }

    [Fact]
    public async Task A_connection_from_an_address_that_is_no_silo_of_the_cluster_is_closed_without_a_greeting()
    {
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        socket.Bind(new IPEndPoint(IPAddress.Parse("127.0.0.2"), 0));   // loopback, but no silo's address
        await socket.ConnectAsync(IPEndPoint.Parse(Lanes[1].Endpoint!));
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        try
        {
            Assert.Equal(0, await socket.ReceiveAsync(new byte[1], SocketFlags.None, timeout.Token));
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
        }
    }

    [Fact]
    public async Task The_byte_budget_lets_a_frame_in_only_when_its_bytes_are_free_first_come_first_served()
    {
        var budget = new ByteBudget(100);
        Assert.True(budget.Take(60, default).IsCompletedSuccessfully);
        var second = budget.Take(50, default);
        var third = budget.Take(10, default);   // would fit, but waits behind the second
        Assert.False(second.IsCompleted);
        Assert.False(third.IsCompleted);
        using var cancel = new CancellationTokenSource();
        var cancelled = budget.Take(30, cancel.Token);
        cancel.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => cancelled);

        budget.Give(60);
        await second;
        await third;
        // 40 left: a cancelled wait took nothing.
        Assert.True(budget.Take(40, default).IsCompletedSuccessfully);
        Assert.False(budget.Take(1, default).IsCompleted);
        Assert.Throws<ArgumentOutOfRangeException>(() => { _ = budget.Take(101, default); });
    }

    [Fact]
    public async Task A_connection_whose_peer_reads_but_never_answers_is_closed_at_the_first_call_that_times_out()
    {
        // A peer that takes frames and answers none (wedged, or hostile): the call times out, and the connection is
        // closed as one that stopped answering (the lane then backs off from it instead of timing out every step).
        using var silent = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        silent.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        silent.Listen();
        var accepting = silent.AcceptAsync();
        using var dialled = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await dialled.ConnectAsync(silent.LocalEndPoint!);
        using var peer = await accepting;
        _ = Task.Run(async () =>
        {
            var sink = new byte[1 << 16];
            try { while (await peer.ReceiveAsync(sink) > 0) { } } catch (SocketException) { }
        });
        var connection = LaneConnection.Dialled(new NetworkStream(dialled, ownsSocket: false), "silent", TimeSpan.FromSeconds(30));

        await Assert.ThrowsAsync<TimeoutException>(() => connection.Call(DataLane.PullKind, new byte[8], ReadOnlyMemory<byte>.Empty, TimeSpan.FromMilliseconds(200)));
        Assert.False(connection.IsOpen);
        Assert.True(connection.StoppedAnswering);
        Assert.False(connection.Answered);
    }
}
