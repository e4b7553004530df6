using System.Diagnostics;
using System.Numerics.Tensors;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Backprop.Grains.Placement;

namespace Backprop.Grains;

/// <summary>Which coordinator owns a shard's run: stored before a new incarnation counts, so that the fence outlives the activation.</summary>
[GenerateSerializer]
public sealed class ShardFence
{
    [Id(0)] public RunSpec? Spec { get; set; }
    [Id(1)] public int Incarnation { get; set; }
}

/// <summary>One stored version of a shard's slice: parameters, the optimizer's state (its vectors one after another), the epoch's loss sum.</summary>
[GenerateSerializer]
public sealed class ShardCheckpoint
{
    [Id(0)] public long Step { get; set; }
    [Id(1)] public FloatPayload? Parameters { get; set; }
    [Id(2)] public FloatPayload? OptimizerState { get; set; }
    [Id(3)] public double EpochLossSum { get; set; }
}

/// <summary>
/// Slice j of a run's parameters and optimizer state (<see cref="ShardLayout"/>), and the only thing that changes it.
/// Workers push their blocks' gradient sums (this slice of them); the block that completes a step applies it in
/// one pass a tile at a time (the blocks combined with the tree above them, the finite check, the optimizer into
/// spare buffers that are swapped in only when the whole slice was finite), and every waiting push returns the new
/// version's slice. A shard keeps the version before the current one (the spare buffers), so a redone block can
/// still be computed on it, and a diverged step or a coordinator that settles on an earlier version can go back.
///
/// Checkpoints go to the older of two stored slots, when the coordinator asks (every CheckpointEvery steps and at
/// epoch ends), for all shards alike; a coordinator attaching picks the latest version every shard can move to.
/// Since a version's bits depend only on the step number, a version stored by any incarnation is the same bits.
/// Spread over the silos by shard number, beside the workers, so that S shards split a step's traffic S ways.
/// </summary>
[SpreadPlacement]
public sealed class ParameterShardGrain(
    [PersistentState("fence", SiloSetup.StorageName)] IPersistentState<ShardFence> fence,
    [PersistentState("checkpoint-a", SiloSetup.StorageName)] IPersistentState<ShardCheckpoint> slotA,
    [PersistentState("checkpoint-b", SiloSetup.StorageName)] IPersistentState<ShardCheckpoint> slotB,
    ILocalSiloDetails silo, DataLane lane) : Grain, IParameterShardGrain
{
    /// <summary>Entries reduced, checked and stepped together, while they are in L1.</summary>
    private const int Tile = 4096;
    /// <summary>How long a push waits for the rest of its step; well under the response timeout, so a redo queued behind a waiting worker is not held up long.</summary>
    private static readonly TimeSpan PushWait = TimeSpan.FromSeconds(2);
    /// <summary>How much longer a push waits once its step has every block and only the norm is missing (normally a few ms).</summary>
    private static readonly TimeSpan NormPendingWait = TimeSpan.FromSeconds(5);
    /// <summary>How long shard 0 holds a norm part's call for the other parts, well under the response timeout; the caller asks again.</summary>
    private static readonly TimeSpan NormWait = TimeSpan.FromSeconds(5);
    /// <summary>How long a shard waits for a step's norm before it gives the step up (its pushes fail, the coordinator attaches again).</summary>
    private static readonly TimeSpan NormGiveUp = TimeSpan.FromMinutes(2);

    private RunSpec? _spec;
    private Optimizer? _optimizer;
    private int _incarnation, _start, _length;
    private long _session, _coordinatorKey;
    /// <summary>The current version; −1 until a coordinator moved the shard to one.</summary>
    private long _step = -1;
    private double _epochLossSum, _previousLossSum;
    /// <summary>The loss sum of the step that made the current version, when this activation applied it (a redone block's push gets it too).</summary>
    private (long Step, double Loss)? _lastStep;
    private float[] _parameters = [], _state = [];
    // The version before the current one while _hasPrevious; the next step is written here, then swapped in.
    private float[] _previous = [], _previousState = [];
    private bool _hasPrevious;

    // The step being gathered: each block's slice (copied on arrival, so the sender's buffer is free at once) and loss.
    private float[][] _blocks = [];
    private bool[] _arrived = [];
    // The arrived sums combined so far: nodes of the reduction tree, each held in the buffer of its first block.
    // _nodeEnd[first] is the block after a node that starts at block `first` (0: no node starts there);
    // _nodeFirst[last] is the first block of the node that ends with block `last` (−1: none).
    private int[] _nodeEnd = [], _nodeFirst = [];
    private int[] _frontStarts = [];
    private double[] _blockLoss = [];
    private int[]? _cut;
    private int _samples, _arrivedCount;
    private double _lossBefore;
    private TaskCompletionSource<PushReply> _applied = NewWaiter();

    // A run that clips: the step's reduced gradient (the norm needs all of it before a tile is stepped) and Σ g² of its norm tiles.
    private float[] _gradient = [];
    private double[] _tileSums = [];
    // Shard 0 of a run that clips: the parts of the step whose norm is being added up, and the last total.
    private NormGather? _norm;
    /// <summary>The waiter of a step whose blocks are all here and whose norm is being added up; the pass's time before the wait.</summary>
    private Task<PushReply>? _normPending;
    private double _reduceSeconds;
    private (long Session, long Step, double Total)? _lastNorm;

    private ReadOnlyMemory<float>[] _leaves = [];
    private readonly float[] _tile = new float[Tile];
    private float[] _scratch = [];
    private string? _siloName;

    private int Shard => SpreadPlacementDirector.IndexOf(this.GetPrimaryKeyString());
    private string SiloName => _siloName ??= silo.SiloAddress.Endpoint.ToString();

    public async Task<ShardPosition> Attach(RunSpec spec, int incarnation, long coordinatorKey)
    {
        if (spec is null) throw new ArgumentException("no run spec");
        spec.Validate();
        spec.CreateOptimizer();   // throws for a schedule whose run length was not resolved at the run's start
        if (incarnation < 1) throw new ArgumentException($"incarnation {incarnation} is not positive");
        string key = this.GetPrimaryKeyString(), runId = RunIdOfKey();
        Backprop.Core.RunIds.Validate(runId);
        // Placement reads "x/-1" or "x/07" as shard 0 or 7 too: only the key the coordinator uses may hold a slice.
        if (key != $"{runId}/{Shard}") throw new ArgumentException($"shard key '{key}' is not {{run id}}/{{shard number}}");
        if (Shard >= spec.ServerShards) throw new ArgumentException($"shard {Shard} of a run with {spec.ServerShards} shards");
        if (fence.State.Spec is { } stored && stored != spec) throw new ArgumentException($"shard {this.GetPrimaryKeyString()} holds a different run");
        await CheckCoordinator(runId, spec, incarnation, coordinatorKey);
        if (incarnation < fence.State.Incarnation)
            throw new StaleCoordinatorException($"coordinator incarnation {incarnation} is superseded by {fence.State.Incarnation}");
        if (incarnation > fence.State.Incarnation || fence.State.Spec is null)
        {
            var before = fence.State;
            fence.State = new ShardFence { Spec = spec, Incarnation = incarnation };
            try
            {
                await fence.WriteAuthoritative((stored, mine) => stored.Incarnation > mine.Incarnation);
            }
            catch (StaleCoordinatorException)
            {
                // The newer fence was read with its ETag: keep it (putting ours back would let a later write overwrite it).
                _incarnation = Math.Max(_incarnation, fence.State.Incarnation);
                throw;
            }
            catch
            {
                fence.State = before;
                throw;
            }
        }
        // The fence counts from here, once stored; pushes of the older coordinator still waiting are told to stop,
        // those of this one (attaching again) to attach with it.
        Exception ended = incarnation > _incarnation
            ? new StaleCoordinatorException($"coordinator incarnation {incarnation} took over shard {Shard}")
            : new ShardMovedException($"shard {Shard} was attached again");
        (_incarnation, _coordinatorKey) = (incarnation, coordinatorKey);
        if (_spec is null) Load(spec);
        EndGather(ended);
        return Position();
    }

    /// <summary>
    /// Only the coordinator that the stored run record names may attach: any other incarnation from a client would fence
    /// the run off for good, and a run id that was never started would get a shard of a spec the run never had.
    /// The record is read from storage (<see cref="StoredRuns"/>), never asked of the coordinator, which awaits this call.
    /// </summary>
    private async Task CheckCoordinator(string runId, RunSpec spec, int incarnation, long coordinatorKey)
    {
        var run = await StoredRuns.Read(ServiceProvider, GrainFactory, runId)
            ?? throw new ArgumentException($"no run '{runId}' is stored: shards attach only to a started run's coordinator");
        if (run.Spec != spec) throw new ArgumentException($"the spec is not run '{runId}''s");
        if (incarnation < run.Incarnation)
            throw new StaleCoordinatorException($"coordinator incarnation {incarnation} is superseded by {run.Incarnation}");
        if (incarnation > run.Incarnation)
            throw new ArgumentException($"coordinator incarnation {incarnation} is not run '{runId}''s (its record holds {run.Incarnation})");
        // The record says who may drive the run; a stopped run has no coordinator, and a loop that finds it so must stop.
        if (run.State != RunState.Running)
            throw new StaleCoordinatorException($"run '{runId}' is {run.State.ToString().ToLowerInvariant()}: no coordinator drives it");
        // The incarnation is no secret (a small count); the key is, and only the coordinator that stored it has it.
        if (coordinatorKey != run.CoordinatorKey)
            throw new ArgumentException($"the caller is not run '{runId}''s coordinator (its key does not match the record's)");
    }

    public Task MoveTo(int incarnation, long coordinatorKey, long session, long step)
    {
        CheckCoordinator(incarnation, coordinatorKey);
        if (step < 0) throw new ArgumentException($"version {step} is negative");
        _session = session;
        if (step == _step)
        {
            EndGather(new ShardMovedException($"shard {Shard} was attached again"));
            return Task.CompletedTask;
        }
        if (_hasPrevious && step == _step - 1)
        {
            (_parameters, _previous) = (_previous, _parameters);
            (_state, _previousState) = (_previousState, _state);
            (_epochLossSum, _hasPrevious) = (_previousLossSum, false);
        }
        // Loaded into fresh arrays: replies of the session before may still be read from the old ones.
        else if (Stored(step) is { } checkpoint)
        {
            if (checkpoint.Parameters?.Length != _length || checkpoint.OptimizerState?.Length != _state.Length)
                throw new InvalidDataException($"shard {Shard}: the checkpoint of step {step} does not fit the run's slice");
            (_parameters, _state) = (checkpoint.Parameters.Span.ToArray(), checkpoint.OptimizerState.Span.ToArray());
            (_previous, _previousState) = (new float[_length], new float[_state.Length]);
            (_epochLossSum, _hasPrevious) = (checkpoint.EpochLossSum, false);
        }
        else if (step == 0)
        {
            _parameters = Initializer.Create(_spec!.Model, _spec.Init, _spec.Seed).AsSpan(_start, _length).ToArray();
            (_state, _previous, _previousState) = (new float[_state.Length], new float[_length], new float[_state.Length]);
            (_epochLossSum, _hasPrevious) = (0, false);
        }
        else
        {
            throw new ArgumentException($"shard {Shard} holds no version {step} (it is at {_step})");
        }
        _step = step;
        _lastStep = null;
        EndGather(new ShardMovedException($"shard {Shard} moved to version {step}"));
        return Task.CompletedTask;
    }

    public async Task<PushReply> Push(GradientPush push)
    {
        if (push is null) throw new ArgumentException("no push");
        Task<PushReply> reply;
        try
        {
            reply = Take(push);
        }
        finally
        {
            // Taken in (copied, combined or applied) or refused: either way the received array goes back to the pool.
            push.Gradient?.Release();
        }
        try
        {
            try
            {
                return await reply.WaitAsync(PushWait);
            }
            catch (TimeoutException) when (reply == _normPending)
            {
                // Every block is here and the step waits only for the other shards' norm parts: a worker that gave up now
                // would stop its window on a step that is about to be applied.
                return await reply.WaitAsync(NormPendingWait);
            }
        }
        catch (TimeoutException)
        {
            return Reply(null, null, 0);   // the step waits for other blocks; the worker pulls the version when it needs it
        }
    }

    /// <summary>Takes a block in, during the call; the task completes when its step is applied.</summary>
    private Task<PushReply> Take(GradientPush push)
    {
        CheckPositioned();
        CheckOwner(push.Incarnation);
        var spec = _spec!;
        if (push.Session != _session) throw new ShardMovedException($"shard {Shard} was attached again since this block's step was sent");
        if (push.Step == _step - 1)   // a redone block of an applied step: the version it made, once its loss is known in this session
            return Task.FromResult(_lastStep?.Step == _step ? Reply(Current(), null, 0) : Reply(null, null, 0));
        if (push.Step != _step) throw new ShardMovedException($"shard {Shard} is at version {_step}; a block of step {push.Step} arrived");
        int count = CheckPush(spec, push);

        if (_cut is null)
        {
            (_cut, _samples, _lossBefore) = (push.BlockStarts, push.Samples, push.EpochLossBefore);
            if (_blocks.Length < count) Array.Resize(ref _blocks, count);
            if (_arrived.Length < count)
            {
                (_arrived, _blockLoss, _nodeEnd, _nodeFirst, _frontStarts) = (new bool[count], new double[count], new int[count], new int[count], new int[count]);
                Array.Fill(_nodeFirst, -1);
            }
        }
        else if (!_cut.AsSpan().SequenceEqual(push.BlockStarts) || _samples != push.Samples || !_lossBefore.Equals(push.EpochLossBefore))
        {
            // Blocks of one step agree within a session; anything else is left over from a step given up on: attach again.
            throw new ShardMovedException($"a block of step {push.Step} with another cut, sample count or loss than the blocks before it");
        }
        var waiter = _applied;
        if (!_arrived[push.Block])
        {
            (_arrived[push.Block], _blockLoss[push.Block]) = (true, push.BlockLoss);
            // The block that completes the step is read where it is, during this call (its sender waits for the
            // reply); the others are combined with their arrived siblings or copied, so that their senders' buffers
            // are free when their pushes return and the last block finds as little left to add as the tree allows.
            if (++_arrivedCount == count) Apply(spec, push.Block, push.Gradient.Memory);
            else Gather(push.Block, push.Gradient.Span, (_samples + spec.ChunkSize - 1) / spec.ChunkSize);
        }
        return waiter.Task;
    }

    public Task<ParameterVersion> Pull(long session, long step)
    {
        CheckPositioned();
        if (session != _session) throw new ShardMovedException($"shard {Shard} was attached again since version {step} was asked for");
        if (step == _step) return Task.FromResult(Current());
        // A copy: the next step is written into these buffers (only redone blocks ask for the version before).
        if (_hasPrevious && step == _step - 1) return Task.FromResult(new ParameterVersion(step, new FloatPayload((float[])_previous.Clone())));
        throw new ShardMovedException($"shard {Shard} is at version {_step}; version {step} was asked for");
    }

    public Task<ParameterVersion> GetParameters()
    {
        if (_spec is not null && _step >= 0) return Task.FromResult(new ParameterVersion(_step, new FloatPayload((float[])_parameters.Clone())));
        var latest = Latest() ?? throw new InvalidOperationException($"shard {this.GetPrimaryKeyString()} has no parameters");
        // A copy: the stored payload's array is pooled, and a reader in this silo releases what it gets.
        return Task.FromResult(new ParameterVersion(latest.Step, new FloatPayload(latest.Parameters!.Span.ToArray())));
    }

    public async Task Checkpoint(int incarnation, long coordinatorKey, long step)
    {
        CheckCoordinator(incarnation, coordinatorKey);
        if (step != _step) throw new ShardMovedException($"shard {Shard} is at version {_step}; a checkpoint of {step} was asked for");
        if (Stored(step) is not null) return;
        // Parameters that overflowed are never stored: the last good checkpoint stays for the diverged run.
        if (!float.IsFinite(TensorPrimitives.Sum<float>(_parameters))) return;
        var slot = !slotA.RecordExists ? slotA : !slotB.RecordExists ? slotB : slotA.State.Step <= slotB.State.Step ? slotA : slotB;
        var before = slot.State;
        // Copies: pushes interleave with the write, and the next steps rewrite these buffers.
        slot.State = new ShardCheckpoint
        {
            Step = step,
            Parameters = new FloatPayload((float[])_parameters.Clone()),
            OptimizerState = new FloatPayload((float[])_state.Clone()),
            EpochLossSum = _epochLossSum,
        };
        try
        {
            long start = Stopwatch.GetTimestamp();
            await slot.WriteAuthoritative();
            BackpropMetrics.Checkpoint(Stopwatch.GetElapsedTime(start));
        }
        catch
        {
            slot.State = before;
            throw;
        }
    }

    public async Task Retire()
    {
        string runId = RunIdOfKey();
        Backprop.Core.RunIds.Validate(runId);
        var run = await StoredRuns.Read(ServiceProvider, GrainFactory, runId);
        // Only a completed run: a running, cancelled or failed one may still need its other version to go on from.
        if (run?.State != RunState.Completed || run.Epochs.Count == 0)
            throw new InvalidOperationException($"shard {Shard}: run '{runId}' is {run?.State.ToString().ToLowerInvariant() ?? "not stored"}, not completed");
        // The final version is the record's, never the caller's: it is the one the run's model and hash are of.
        long step = run.Epochs[^1].Steps;
        if (Stored(step) is null) throw new InvalidOperationException($"shard {Shard} holds no stored version {step}, the run's final one");
        foreach (var slot in new[] { slotA, slotB })
            if (slot.RecordExists && slot.State.Step != step) await slot.ClearStateAsync();
        DeactivateOnIdle();
    }

    public async Task Forget()
    {
        string runId = RunIdOfKey();
        Backprop.Core.RunIds.Validate(runId);
        if (!await GrainFactory.GetGrain<IRunRegistryGrain>(RunRegistryGrain.Key).IsBeingDeleted(runId))
            throw new InvalidOperationException($"run '{runId}' is not being deleted: a shard's state goes only with its run, when the run list's retention evicted it");
        foreach (var state in new Orleans.Core.IStorage[] { slotA, slotB, fence })
            if (state.RecordExists) await state.ClearStateAsync();
        EndGather(new ShardMovedException($"shard {Shard}: its run was deleted"));
        DeactivateOnIdle();
    }

    /// <summary>"run" of this grain's key "run/j".</summary>
    private string RunIdOfKey()
    {
        string key = this.GetPrimaryKeyString();
        return key[..Math.Max(0, key.LastIndexOf('/'))];
    }

    /// <summary>The checks of a push that need the spec; returns the step's block count.</summary>
    private int CheckPush(RunSpec spec, GradientPush push)
    {
        if (push.Gradient is null || push.Gradient.Length != _length)
            throw new ArgumentException($"a gradient slice of length {push.Gradient?.Length ?? 0} for shard {Shard}'s {_length} parameters");
        if (push.Samples < 1 || push.Samples > spec.BatchSize)
            throw new ArgumentException($"a step's sample count {push.Samples} is outside 1..{spec.BatchSize}");
        int chunks = (push.Samples + spec.ChunkSize - 1) / spec.ChunkSize;
        var starts = push.BlockStarts;
        if (starts is null || starts.Length < 1 || starts.Length > chunks)
            throw new ArgumentException($"a step of {chunks} chunks cut into {starts?.Length ?? 0} blocks");
        if (_cut is null || !ReferenceEquals(_cut, starts))
            for (int i = 0; i < starts.Length; i++)
                if ((i == 0 && starts[0] != 0) || !PairwiseSum.IsNode(starts[i], i + 1 < starts.Length ? starts[i + 1] : chunks, chunks))
                    throw new ArgumentException($"the blocks starting at chunks [{string.Join(",", starts)}] are not nodes of the reduction tree covering the step's {chunks} chunks");
        if (push.Block < 0 || push.Block >= starts.Length) throw new ArgumentException($"block {push.Block} of a step cut into {starts.Length}");
        return starts.Length;
    }

    /// <summary>Every block is here: reduce, check, step; then answer every waiting push.</summary>
    private void Apply(RunSpec spec, int lastBlock, ReadOnlyMemory<float> last)
    {
        long start = Stopwatch.GetTimestamp();
        int count = _cut!.Length, chunks = (_samples + spec.ChunkSize - 1) / spec.ChunkSize;
        double stepLoss = 0;
        for (int b = 0; b < count; b++) stepLoss += _blockLoss[b];   // block order: the coordinator adds them the same way
        if (!double.IsFinite(stepLoss))
        {
            Finish($"training loss is {stepLoss}", stepLoss, Stopwatch.GetElapsedTime(start).TotalSeconds);
            return;
        }
        if (spec.ClipNorm > 0)
        {
            Reduce(clip: true, count, chunks, lastBlock, last);
            (_normPending, _reduceSeconds) = (_applied.Task, Stopwatch.GetElapsedTime(start).TotalSeconds);
            _ = ClipAndStep(spec, _applied, stepLoss);
            return;
        }
        bool finite = Reduce(clip: false, count, chunks, lastBlock, last);
        Finish(finite ? null : "the gradient has non-finite values", stepLoss, Stopwatch.GetElapsedTime(start).TotalSeconds);
    }

    /// <summary>
    /// The step is decided: swaps in the version it made (none when it diverged) and answers every waiting push.
    /// <paramref name="seconds"/>: the shard's own pass (reduce and step), without a wait for the norm.
    /// </summary>
    private void Finish(string? divergence, double stepLoss, double seconds)
    {
        if (divergence is null)
        {
            (_parameters, _previous) = (_previous, _parameters);
            (_state, _previousState) = (_previousState, _state);
            (_previousLossSum, _epochLossSum, _hasPrevious) = (_epochLossSum, _lossBefore + stepLoss, true);
            _step++;
            _lastStep = (_step, stepLoss);
        }
        else
        {
            _hasPrevious = false;   // the refused step wrote part of its tiles over the version before
        }
        var waiter = _applied;
        EndGather(null);
        waiter.TrySetResult(Reply(divergence is null ? Current() : null, divergence, seconds));
    }

    /// <summary>
    /// Takes in a block that does not complete the step: while the node it is part of has its sibling here, the two
    /// become their parent (left + right, the tree's one way to add them, so the bits are those of adding them at the
    /// end), up the tree as far as the arrived blocks allow.
    /// </summary>
    private void Gather(int block, ReadOnlySpan<float> values, int chunks)
    {
        var starts = _cut!;
        int count = starts.Length, first = block, end = block + 1;
        bool stored = false;
        while (true)
        {
            int lo = starts[first], mid = end < count ? starts[end] : chunks;
            if (end < count && _nodeEnd[end] > 0 && IsParent(lo, mid, Chunk(_nodeEnd[end]), chunks))
            {
                // The right sibling is here: this node becomes the parent, in this node's buffer.
                var parent = _blocks[first] ??= new float[_length];
                TensorPrimitives.Add(stored ? parent : values, _blocks[end], parent);
                int rightEnd = _nodeEnd[end];
                (_nodeEnd[end], _nodeFirst[rightEnd - 1], end, stored) = (0, -1, rightEnd, true);
                continue;
            }
            if (first > 0 && _nodeFirst[first - 1] is int left and >= 0 && IsParent(starts[left], lo, mid, chunks))
            {
                // The left sibling is here: it becomes the parent, in its buffer.
                TensorPrimitives.Add(_blocks[left], stored ? _blocks[first] : values, _blocks[left]);
                (_nodeEnd[left], _nodeFirst[first - 1], first, stored) = (0, -1, left, true);
                continue;
            }
            break;
        }
        if (!stored) values.CopyTo(_blocks[first] ??= new float[_length]);
        (_nodeEnd[first], _nodeFirst[end - 1]) = (end, first);

        int Chunk(int b) => b < count ? starts[b] : chunks;
    }

    /// <summary>Whether chunks [lo, mid) and [mid, hi) are the two children of the node [lo, hi).</summary>
    private static bool IsParent(int lo, int mid, int hi, int chunks) =>
        hi - lo >= 2 && PairwiseSum.IsNode(lo, hi, chunks) && mid == lo + PairwiseSum.LeftSize(hi - lo);

    /// <summary>
    /// The blocks' slices combined with the tree above them a tile at a time. Without <paramref name="clip"/> each tile
    /// is checked and the optimizer's step written to the spare buffers while it is in L1: false, with the current
    /// version untouched, when the gradient has a non-finite value (an overflow to infinity in a tile's sum counts too).
    /// With it each tile goes to <see cref="_gradient"/> with its norm tiles' Σ g² (true): the step waits for the norm.
    /// </summary>
    private bool Reduce(bool clip, int count, int chunks, int lastBlock, ReadOnlyMemory<float> last)
    {
        if (_leaves.Length != count) _leaves = new ReadOnlyMemory<float>[count];
        // The nodes gathered so far and the last block, in chunk order: a cut of the tree, coarser than the blocks'.
        int nodes = 0;
        for (int i = 0; i < count; nodes++)
        {
            _frontStarts[nodes] = _cut![i];
            (_leaves[nodes], i) = i == lastBlock ? (last, i + 1) : (_blocks[i], _nodeEnd[i]);
        }
        count = nodes;
        var frontStarts = _frontStarts.AsSpan(0, nodes);
        try
        {
            for (int start = 0; start < _length; start += Tile)
            {
                int n = Math.Min(Tile, _length - start);
                var dest = clip ? _gradient.AsSpan(start, n) : _tile.AsSpan(0, n);
                ReadOnlySpan<float> gradient = count == 1 ? _leaves[0].Span.Slice(start, n) : dest;
                if (count > 1) PairwiseSum.SumNodes(_leaves.AsSpan(0, count), frontStarts, chunks, start, dest, _scratch);
                if (clip)
                {
                    if (count == 1) gradient.CopyTo(dest);   // the last block's buffer goes back to the pool when its push returns
                    // Tile is a multiple of the norm tile, and the slice starts on one: these are whole norm tiles of the run's.
                    GradientClip.SquaredSums(dest, _tileSums.AsSpan(start / GradientClip.Tile, GradientClip.Tiles(n)));
                    continue;
                }
                if (!float.IsFinite(TensorPrimitives.Sum(gradient))) return false;
                _optimizer!.Step(_step, _parameters.AsSpan(start, n), gradient, _samples, new StateTile(_state, _length, start, n),
                    _previous.AsSpan(start, n), new StateTile(_previousState, _length, start, n));
            }
            return true;
        }
        finally
        {
            Array.Clear(_leaves);
        }
    }

    /// <summary>
    /// The rest of a clipped step, once every block is reduced: the norm over all shards (shard 0 adds up their parts),
    /// the scale, and the step into the spare buffers. Runs past the push that completed the step; a shard attached or
    /// moved meanwhile has ended the gather, and then nothing here changes the shard.
    /// </summary>
    private async Task ClipAndStep(RunSpec spec, TaskCompletionSource<PushReply> waiter, double stepLoss)
    {
        try
        {
            int samples = _samples;
            double total = await NormTotal(waiter, _session, _step);
            if (waiter != _applied) return;
            if (!double.IsFinite(total))
            {
                Finish("the gradient has non-finite values", stepLoss, _reduceSeconds);
                return;
            }
            long start = Stopwatch.GetTimestamp();
            GradientClip.Step(_optimizer!, _step, GradientClip.Scale(total, samples, spec.ClipNorm), samples, _parameters, _gradient,
                _state, _previous, _previousState, _tile);
            Finish(null, stepLoss, _reduceSeconds + Stopwatch.GetElapsedTime(start).TotalSeconds);
        }
        catch (Exception e)
        {
            // The pushes waiting for this step fail; the coordinator attaches again and the step is redone.
            if (waiter == _applied)
                EndGather(e is StaleCoordinatorException or ShardMovedException ? e : new ShardMovedException($"shard {Shard}: step {_step}'s gradient norm: {e.Message}"));
        }
    }

    /// <summary>The squared norm of the step's whole gradient: this shard's tiles alone, or every shard's added up by shard 0.</summary>
    private async Task<double> NormTotal(TaskCompletionSource<PushReply> waiter, long session, long step)
    {
        if (_spec!.ServerShards == 1) return GradientClip.Total(_tileSums);
        var sums = (double[])_tileSums.Clone();   // the part's own array: the next step rewrites the shard's
        if (Shard == 0) return await Deposit(session, step, 0, sums).Task.WaitAsync(NormGiveUp);
        var zero = GrainFactory.GetGrain<IParameterShardGrain>($"{RunIdOfKey()}/0");
        var part = new NormPart(_incarnation, session, step, Shard, sums);
        long asked = Stopwatch.GetTimestamp();
        while (true)
        {
            if (await zero.GradientNorm(part) is { } total) return total;
            if (waiter != _applied) return double.NaN;   // given up on meanwhile: the caller drops it
            if (Stopwatch.GetElapsedTime(asked) > NormGiveUp)
                throw new ShardMovedException($"shard {Shard}: shard 0 did not have every shard's part of step {step}'s gradient norm within {NormGiveUp.TotalMinutes:0} minutes");
        }
    }

    public async Task<double?> GradientNorm(NormPart part)
    {
        if (part is null) throw new ArgumentException("no norm part");
        CheckPositioned();
        CheckOwner(part.Incarnation);
        var spec = _spec!;
        if (Shard != 0) throw new ArgumentException($"shard {Shard} is not shard 0: parts of a gradient norm go to shard 0");
        if (spec.ClipNorm <= 0) throw new ArgumentException("the run does not clip its gradient: there is no norm to add up");
        if (part.Shard < 1 || part.Shard >= spec.ServerShards)
            throw new ArgumentException($"a norm part of shard {part.Shard}: the run's other shards are 1..{spec.ServerShards - 1}");
        int tiles = GradientClip.Tiles(spec.Shards.Length(part.Shard));
        if (part.TileSums is null || part.TileSums.Length != tiles)
            throw new ArgumentException($"{part.TileSums?.Length ?? 0} tile sums for the {tiles} norm tiles of shard {part.Shard}");
        foreach (double sum in part.TileSums)
            if (sum < 0) throw new ArgumentException($"a tile's sum of squares {sum} is negative");
        if (part.Session != _session) throw new ShardMovedException($"shard 0 was attached again since step {part.Step}'s norm was sent");
        if (_lastNorm is { } last && last.Session == part.Session && last.Step == part.Step) return last.Total;
        try
        {
            return await Deposit(part.Session, part.Step, part.Shard, part.TileSums).Task.WaitAsync(NormWait);
        }
        catch (TimeoutException)
        {
            return null;
        }
    }

    /// <summary>Shard 0: takes shard <paramref name="shard"/>'s part of step <paramref name="step"/>'s norm; the total is set once every shard's is in.</summary>
    private TaskCompletionSource<double> Deposit(long session, long step, int shard, double[] tileSums)
    {
        // Shard 0 moves past a step only once its norm is complete, so a part of any other step is left over from a redo given up on.
        if (session != _session || step != _step)
            throw new ShardMovedException($"shard 0 is at version {_step}; a part of step {step}'s gradient norm arrived");
        if (_norm is not { } gather || gather.Session != session || gather.Step != step)
        {
            _norm?.Total.TrySetException(new ShardMovedException($"shard 0 went on to step {step}'s gradient norm"));
            _norm = gather = new NormGather(session, step, _spec!.ServerShards);
        }
        // A part sent again (its call timed out) holds the same numbers: the first is kept.
        if (gather.Parts[shard] is null)
        {
            gather.Parts[shard] = tileSums;
            if (++gather.Count == gather.Parts.Length)
            {
                // Shard order is tile order: one run of additions over all tiles, as over the whole vector.
                double total = GradientClip.Total(gather.Parts!);
                _lastNorm = (session, step, total);
                _norm = null;
                gather.Total.TrySetResult(total);
            }
        }
        return gather.Total;
    }

    /// <summary>The parts of one step's gradient norm that shard 0 holds so far.</summary>
    private sealed class NormGather(long session, long step, int shards)
    {
        public long Session { get; } = session;
        public long Step { get; } = step;
        public double[]?[] Parts { get; } = new double[shards][];
        public int Count { get; set; }
        public TaskCompletionSource<double> Total { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }

    /// <summary>Forgets the step being gathered; pushes still waiting for it get <paramref name="error"/> (none: the caller answers them).</summary>
    private void EndGather(Exception? error)
    {
        var waiter = _applied;
        _applied = NewWaiter();
        (_cut, _arrivedCount, _normPending) = (null, 0, null);
        Array.Clear(_arrived);
        Array.Clear(_nodeEnd);
        Array.Fill(_nodeFirst, -1);
        if (error is not null)
        {
            waiter.TrySetException(error);
            _norm?.Total.TrySetException(error);
            _norm = null;
        }
    }

    /// <summary>Attached and moved to a version: what pushes and pulls need.</summary>
    private void CheckPositioned()
    {
        if (_step < 0) throw new ShardMovedException($"shard {this.GetPrimaryKeyString()} is not attached to a coordinator");
    }

    /// <summary>The coordinator that attached: its incarnation, and the key only it holds (the incarnation is no secret).</summary>
    private void CheckCoordinator(int incarnation, long coordinatorKey)
    {
        CheckOwner(incarnation);
        if (coordinatorKey != _coordinatorKey) throw new ArgumentException($"shard {Shard}: the caller is not the coordinator that attached (key)");
    }

    private void CheckOwner(int incarnation)
    {
        if (_spec is null) throw new ShardMovedException($"shard {this.GetPrimaryKeyString()} is not attached to a coordinator");
        if (incarnation < _incarnation) throw new StaleCoordinatorException($"coordinator incarnation {incarnation} is superseded by {_incarnation}");
        if (incarnation > _incarnation) throw new ShardMovedException($"shard {Shard} is not attached to coordinator incarnation {incarnation} yet");
    }

    private ShardPosition Position()
    {
        var steps = new List<(long Step, double Loss)> { (0, 0) };
        if (_step >= 0) steps.Add((_step, _epochLossSum));
        if (_hasPrevious) steps.Add((_step - 1, _previousLossSum));
        foreach (var slot in new[] { slotA, slotB })
            if (slot.RecordExists && slot.State.Parameters is not null) steps.Add((slot.State.Step, slot.State.EpochLossSum));
        var distinct = steps.DistinctBy(s => s.Step).OrderBy(s => s.Step).ToArray();
        return new ShardPosition(distinct.Select(s => s.Step).ToArray(), distinct.Select(s => s.Loss).ToArray(),
            Latest()?.Step ?? 0, SiloName);
    }

    private ShardCheckpoint? Stored(long step) =>
        slotA.RecordExists && slotA.State.Step == step && slotA.State.Parameters is not null ? slotA.State
        : slotB.RecordExists && slotB.State.Step == step && slotB.State.Parameters is not null ? slotB.State : null;

    private ShardCheckpoint? Latest()
    {
        var a = slotA.RecordExists && slotA.State.Parameters is not null ? slotA.State : null;
        var b = slotB.RecordExists && slotB.State.Parameters is not null ? slotB.State : null;
        return a is null ? b : b is null || a.Step >= b.Step ? a : b;
    }

    private void Load(RunSpec spec)
    {
        var layout = spec.Shards;
        (_spec, _optimizer) = (spec, spec.CreateOptimizer());
        (_start, _length) = (layout.Start(Shard), layout.Length(Shard));
        int stateLength = checked(_optimizer.StateVectors * _length);
        (_parameters, _previous) = (new float[_length], new float[_length]);
        (_state, _previousState) = (new float[stateLength], new float[stateLength]);
        _scratch = new float[PairwiseSum.ScratchFor(Tile, spec.ChunksPerStep)];
        bool clips = spec.ClipNorm > 0;
        (_gradient, _tileSums) = (clips ? new float[_length] : [], new double[clips ? GradientClip.Tiles(_length) : 0]);
        (_step, _hasPrevious) = (-1, false);
    }

    // By reference: a reply is written (serialized by Orleans, or sent by a data lane after the turn) from the live buffer.
    // It cannot be overwritten before its reader has it while that reader's next push is needed for the next step; a
    // late answer to a call that gave up may be torn, but its reader only computes a block of a step already applied,
    // which the shards refuse or ignore.
    private ParameterVersion Current() => new(_step, new FloatPayload(_parameters));

    private PushReply Reply(ParameterVersion? next, string? divergence, double seconds) =>
        new(next, divergence, seconds, GC.GetTotalAllocatedBytes(precise: false), SiloName, next is null ? 0 : _lastStep!.Value.Loss, next is null ? 0 : _epochLossSum, lane.Endpoint);

    private static TaskCompletionSource<PushReply> NewWaiter() => new(TaskCreationOptions.RunContinuationsAsynchronously);
}

/// <summary>A newer coordinator owns the run: the caller must stop (never retried).</summary>
[GenerateSerializer]
public sealed class StaleCoordinatorException : Exception
{
    public StaleCoordinatorException(string message) : base(message) { }
}

/// <summary>
/// A shard is not at the version a call needs (it lost its activation, or was moved): the coordinator attaches
/// to every shard again and goes on from the latest version they can all move to.
/// </summary>
[GenerateSerializer]
public sealed class ShardMovedException : Exception
{
    public ShardMovedException(string message) : base(message) { }
}
