using System.Buffers;
using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Net.Sockets;
using Backprop.Grains.Messages;

namespace Backprop.Grains.Hosting;

/// <summary>
/// A frame read from a data lane: its kind, request id, header (a message in Orleans' format) and vector (rented: its
/// reader releases it); <see cref="Budgeted"/>: the bytes it took from the reading lane's <see cref="ByteBudget"/>.
/// </summary>
internal sealed record LaneFrame(byte Kind, long Id, byte[] Header, FloatPayload? Payload, long Budgeted = 0);

/// <summary>
/// One TCP connection of a <see cref="DataLane"/>. Frames are written whole, one at a time; one reader reads them. On
/// the dialling end the reader hands each answer to the call waiting for its id; on the accepting end the lane reads requests.
/// </summary>
internal sealed class LaneConnection
{
    private const int PrefixBytes = 17;   // kind (1), request id (8), header bytes (4), payload bytes (4); little-endian
    /// <summary>A header holds a push without its vector (the cut: a few ints per block) or an exception.</summary>
    internal const int MaxHeaderBytes = 1 << 20;

    private readonly Stream _stream;
    private readonly TimeSpan _sendLimit;
    private readonly SemaphoreSlim _writing = new(1, 1);
    private readonly byte[] _prefix = new byte[PrefixBytes];
    private readonly ConcurrentDictionary<long, TaskCompletionSource<LaneFrame>> _waiting = new();
    /// <summary>Tests only: the task schedulers that dialled connections' readers ran on (the thread pool's, never a grain's).</summary>
    internal static readonly ConcurrentDictionary<string, byte> ReaderSchedulers = new();
    private long _lastId;
    private int _closed;
    private Exception? _why;

    /// <param name="sendLimit">How long a frame may take to go out once started: a peer that stops reading for longer is cut off.</param>
    /// <param name="stream">The connection's socket as a stream, or a TLS stream over it.</param>
    public LaneConnection(Stream stream, string peer, TimeSpan sendLimit) => (_stream, Peer, _sendLimit) = (stream, peer, sendLimit);

    public string Peer { get; }
    public bool IsOpen => Volatile.Read(ref _closed) == 0;
    /// <summary>Whether an answer came back on this (dialled) connection: one that closes before any did is judged a failed dial.</summary>
    public bool Answered => Volatile.Read(ref _answered) != 0;
    private int _answered;
    private long _lastAnswerAt = Environment.TickCount64;

    /// <summary>Closed because its peer stopped answering (a call timed out with no answer on the connection for as long).</summary>
    public bool StoppedAnswering => Volatile.Read(ref _closed) != 0 && _why is TimeoutException;
    /// <summary>Closed with calls still waiting on it (they failed).</summary>
    public bool CutWithCallsWaiting => Volatile.Read(ref _cutWithCallsWaiting) != 0;
    private int _cutWithCallsWaiting;

    /// <summary>A connection this end dialled: its reader takes answers from now on.</summary>
    public static LaneConnection Dialled(Stream stream, string peer, TimeSpan sendLimit)
    {
        var connection = new LaneConnection(stream, peer, sendLimit);
        _ = connection.ReadAnswers();
        return connection;
    }

    /// <summary>Sends a request and waits for its answer, at most <paramref name="timeout"/> (as a grain call would).</summary>
    public async Task<LaneFrame> Call(byte kind, byte[] header, ReadOnlyMemory<byte> payload, TimeSpan timeout)
    {
        long id = Interlocked.Increment(ref _lastId);
        var answer = new TaskCompletionSource<LaneFrame>(TaskCreationOptions.RunContinuationsAsynchronously);
        _waiting[id] = answer;
        using var deadline = new CancellationTokenSource(timeout);
        try
        {
            // Close sets the flag before it fails the waiting calls: a call added after that sees the flag here.
            if (!IsOpen) throw Closed();
            await Write(kind, id, header, payload, deadline.Token);
            return await answer.Task.WaitAsync(deadline.Token);
        }
        catch (OperationCanceledException) when (deadline.IsCancellationRequested)
        {
            // Nothing came back on this connection for a whole timeout: its peer reads but does not answer (wedged, or
            // hostile). Closed, so that the next calls go through Orleans while the lane backs off, not to time out too.
            if (Environment.TickCount64 - Interlocked.Read(ref _lastAnswerAt) >= (long)timeout.TotalMilliseconds)
                Close(new TimeoutException($"no answer within {timeout.TotalSeconds:0.#} s"));
            throw new TimeoutException($"data lane to {Peer}: no answer within {timeout.TotalSeconds:0.#} s");
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or OperationCanceledException)
        {
            // A frame over the send limit (its connection is closed) is a broken connection to the coordinator, which
            // redoes the block; a cancellation would stop the run.
            throw new IOException($"data lane to {Peer}: {e.Message}", e);
        }
        finally
        {
            // Taken by Close (or the reader) meanwhile: a failure set after this call stopped waiting (its write failed,
            // or it timed out) is observed here, not left to the finalizer's unobserved-exception event.
            if (!_waiting.TryRemove(id, out _) && !answer.Task.IsCompletedSuccessfully)
                _ = answer.Task.ContinueWith(static t => _ = t.Exception, CancellationToken.None,
                    TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        }
    }

    /// <summary>Sends the one byte that tells a dialler it is accepted, before any frame.</summary>
    public async Task Greet(byte accepted)
    {
        using var limit = new CancellationTokenSource(_sendLimit);
        await Send(new[] { accepted }, limit.Token);
    }

    /// <summary>Writes the answer to request <paramref name="id"/>.</summary>
    public Task Answer(byte kind, long id, byte[] header, ReadOnlyMemory<byte> payload) => Write(kind, id, header, payload, CancellationToken.None);

    /// <summary>
    /// Writes a whole frame. <paramref name="cancel"/> stops only the wait for the connection: a frame once started goes
    /// out whole (cutting it would break the stream for every other call on it), within the send limit.
    /// </summary>
    private async Task Write(byte kind, long id, byte[] header, ReadOnlyMemory<byte> payload, CancellationToken cancel)
    {
        if (header.Length > MaxHeaderBytes || payload.Length > Backprop.Core.ResourceLimits.MaxMessageBytes)
            throw new InvalidDataException($"a frame of {header.Length} header and {payload.Length} payload bytes is over the data lane's limits");
        int length = PrefixBytes + header.Length;
        var head = ArrayPool<byte>.Shared.Rent(length);
        try
        {
            head[0] = kind;
            BinaryPrimitives.WriteInt64LittleEndian(head.AsSpan(1), id);
            BinaryPrimitives.WriteInt32LittleEndian(head.AsSpan(9), header.Length);
            BinaryPrimitives.WriteInt32LittleEndian(head.AsSpan(13), payload.Length);
            header.CopyTo(head, PrefixBytes);
            await _writing.WaitAsync(cancel);
            try
            {
                using var limit = new CancellationTokenSource(_sendLimit);
                await Send(head.AsMemory(0, length), limit.Token);
                await Send(payload, limit.Token);
            }
            catch (Exception e)
            {
                // Part of a frame may be out: the stream cannot be read past it.
                Close(e);
                throw;
            }
            finally
            {
                _writing.Release();
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(head);
        }
    }

    private async ValueTask Send(ReadOnlyMemory<byte> bytes, CancellationToken cancel)
    {
        if (!bytes.IsEmpty) await _stream.WriteAsync(bytes, cancel);
    }

    /// <summary>
    /// The next frame; its sizes are checked, and taken from <paramref name="budget"/> where there is one, before anything
    /// is allocated for it. Once its first byte is in, the rest must follow within <paramref name="deadline"/>.
    /// </summary>
    public async Task<LaneFrame> Read(ByteBudget? budget, TimeSpan deadline, CancellationToken cancel)
    {
        await Receive(_prefix.AsMemory(0, 1), cancel);
        using var late = CancellationTokenSource.CreateLinkedTokenSource(cancel);
        late.CancelAfter(deadline);
        await Receive(_prefix.AsMemory(1), late.Token);
        byte kind = _prefix[0];
        long id = BinaryPrimitives.ReadInt64LittleEndian(_prefix.AsSpan(1));
        uint headerBytes = BinaryPrimitives.ReadUInt32LittleEndian(_prefix.AsSpan(9));
        uint payloadBytes = BinaryPrimitives.ReadUInt32LittleEndian(_prefix.AsSpan(13));
        if (headerBytes > MaxHeaderBytes) throw new InvalidDataException($"a header of {headerBytes} bytes (at most {MaxHeaderBytes})");
        if (payloadBytes > Backprop.Core.ResourceLimits.MaxMessageBytes || payloadBytes % sizeof(float) != 0)
            throw new InvalidDataException($"a payload of {payloadBytes} bytes (a float vector of at most {Backprop.Core.ResourceLimits.MaxMessageBytes} bytes)");
        long budgeted = budget is null ? 0 : headerBytes + (long)payloadBytes;
        if (budget is not null)
        {
            // A wait for the budget is the lane's own (other requests not yet taken by their shards), not a late peer's.
            await budget.Take(budgeted, cancel);
            late.CancelAfter(deadline);
        }
        FloatPayload? payload = null;
        try
        {
            var header = new byte[headerBytes];
            await Receive(header, late.Token);
            if (payloadBytes == 0) return new LaneFrame(kind, id, header, null, budgeted);
            payload = FloatPayload.Rent((int)(payloadBytes / sizeof(float)));
            await Receive(payload.FillingBytes, late.Token);
            return new LaneFrame(kind, id, header, payload, budgeted);
        }
        catch
        {
            payload?.Release();
            budget?.Give(budgeted);
            throw;
        }
    }

    private async ValueTask Receive(Memory<byte> into, CancellationToken cancel)
    {
        while (!into.IsEmpty)
        {
            int read = await _stream.ReadAsync(into, cancel);
            if (read == 0) throw new IOException("closed by the peer");
            into = into[read..];
        }
    }

    private async Task ReadAnswers()
    {
        try
        {
            while (true)
            {
                var frame = await Read(null, _sendLimit, CancellationToken.None);
                ReaderSchedulers.TryAdd(TaskScheduler.Current.GetType().Name, 0);
                if (frame.Kind is not (DataLane.AnswerKind or DataLane.ErrorKind))
                {
                    frame.Payload?.Release();
                    throw new InvalidDataException($"an answer of kind {frame.Kind}");
                }
                // Only an answer to a request this end sent counts (a peer cannot dodge the short-lived judgement, and
                // so the back-off, with an unsolicited frame right after its greeting).
                if (frame.Id >= 1 && frame.Id <= Interlocked.Read(ref _lastId))
                {
                    Volatile.Write(ref _answered, 1);
                    Interlocked.Exchange(ref _lastAnswerAt, Environment.TickCount64);
                }
                // An answer whose call gave up (timed out) has no one to take it.
                if (!(_waiting.TryRemove(frame.Id, out var waiter) && waiter.TrySetResult(frame))) frame.Payload?.Release();
            }
        }
        catch (Exception e)
        {
            Close(e);
        }
    }

    /// <summary>Closes the connection and fails every call waiting on it; once.</summary>
    public void Close(Exception? why)
    {
        if (Interlocked.Exchange(ref _closed, 1) == 1) return;
        _why = why;
        if (!_waiting.IsEmpty) Volatile.Write(ref _cutWithCallsWaiting, 1);
        _stream.Dispose();
        foreach (var id in _waiting.Keys)
            if (_waiting.TryRemove(id, out var waiter)) waiter.TrySetException(Closed());
    }

    private IOException Closed() => new($"data lane to {Peer} closed{(_why is null ? "" : $": {_why.Message}")}");
}
