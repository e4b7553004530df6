using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Orleans.Configuration;
using Orleans.Serialization;

namespace Backprop.Grains.Hosting;

/// <summary>Where a silo's data lane listens (<see cref="Port"/> 0: any free port), or why it has none.</summary>
public sealed class LaneOptions
{
    public int Port { get; set; }
    /// <summary>Why this silo has no data lane (every push and pull goes through Orleans); null: it has one.</summary>
    public string? Off { get; set; }
}

/// <summary>
/// A silo's data lane: TCP connections of its own, one per pair of silos, that carry a worker's pushes to and pulls
/// from a shard on another silo beside Orleans' connection, at the raw-TCP floor (bench/README "Wire": Orleans moves
/// a vector at about half of it, through three threads and two copies). Only the transport changes: the lane's end on
/// the shard's silo makes the same grain call there (<see cref="IParameterShardGrain.Push"/>, <see cref="IParameterShardGrain.Pull"/>),
/// a local one where the shard lives, and writes back the reply or the exception, so fencing, sessions, duplicates and
/// redos are the grain's as before. A frame is a 17-byte prefix (kind, request id, header and payload byte counts),
/// the header (the message without its vector, in Orleans' format) and the vector as raw little-endian floats, read
/// straight into a pooled payload array. A worker dials a lane only where a shard's reply named one; when it cannot
/// connect it uses the grain call. A connection that breaks fails the calls waiting on it (the coordinator redoes
/// their blocks); one that sends a frame out of bounds is closed before anything is allocated for it.
/// Off under TLS (the lane has none of its own yet) and with <see cref="LaneOptions.Port"/> −1.
/// </summary>
public sealed class DataLane(IOptions<LaneOptions> options, ILocalSiloDetails silo, IGrainFactory grains, Serializer serializer,
    IOptions<SiloMessagingOptions> messaging, ILogger<DataLane> logger) : ILifecycleParticipant<ISiloLifecycle>, IAsyncDisposable
{
    internal const byte PushKind = 1, PullKind = 2, AnswerKind = 3, ErrorKind = 4;
    /// <summary>Requests a connection's reader takes in before it waits for their answers: a peer cannot pile up unbounded payloads.</summary>
    private const int MaxInFlight = 256;
    private static readonly TimeSpan ConnectTimeout = TimeSpan.FromSeconds(2);
    /// <summary>How long a lane that could not be dialled is passed over (its calls go through Orleans) before it is tried again.</summary>
    private static readonly TimeSpan RetryDialAfter = TimeSpan.FromSeconds(5);
    private static readonly FloatPayload NoValues = new(Array.Empty<float>());

    private readonly CancellationTokenSource _stopping = new();
    private Socket? _listener;
    private readonly ConcurrentDictionary<LaneConnection, byte> _accepted = new();
    private readonly Dictionary<string, (Task<LaneConnection?> Dialling, long RetryAfter)> _dialled = new();
    private long _served, _called;

    /// <summary>Where this silo's lane listens, "address:port"; null while it has none.</summary>
    public string? Endpoint { get; private set; }
    /// <summary>Requests this silo's lane answered, and requests this silo sent through lanes: for tests and the bench.</summary>
    public long Served => Interlocked.Read(ref _served);
    public long Called => Interlocked.Read(ref _called);

    public void Participate(ISiloLifecycle lifecycle) =>
        lifecycle.Subscribe(nameof(DataLane), ServiceLifecycleStage.Active, _ => Start(), _ => DisposeAsync().AsTask());

    private Task Start()
    {
        if (options.Value.Off is { } off)
        {
            logger.LogInformation("Data lane off ({Why}): payloads go through Orleans", off);
            return Task.CompletedTask;
        }
        var address = silo.SiloAddress.Endpoint.Address;
        var listener = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            listener.Bind(new IPEndPoint(address, options.Value.Port));
            listener.Listen(512);
        }
        catch (SocketException e)
        {
            listener.Dispose();
            logger.LogWarning("Data lane: cannot listen on {Address}:{Port} ({Error}); payloads go through Orleans", address, options.Value.Port, e.Message);
            return Task.CompletedTask;
        }
        _listener = listener;
        Endpoint = listener.LocalEndPoint!.ToString();
        logger.LogInformation("Data lane listening on {Endpoint}", Endpoint);
        _ = Accept(listener);
        return Task.CompletedTask;
    }

    /// <summary>Shard <paramref name="shard"/>'s push through the lane at <paramref name="lane"/>, or <paramref name="viaOrleans"/> when it cannot be dialled.</summary>
    public async Task<PushReply> Push(string lane, string shard, GradientPush push, Func<Task<PushReply>> viaOrleans)
    {
        if (await Dial(lane) is not { } connection) return await viaOrleans();
        var header = serializer.SerializeToArray(new LanePush(shard, push with { Gradient = NoValues }));
        var answer = await Call(connection, PushKind, header, push.Gradient.Bytes);
        var reply = Read<PushReply>(answer.Header);
        if (reply.Next is { } next) return reply with { Next = next with { Parameters = answer.Payload ?? NoValues } };
        answer.Payload?.Release();
        return reply;
    }

    /// <summary>Shard <paramref name="shard"/>'s slice of version <paramref name="step"/> through the lane at <paramref name="lane"/>, or <paramref name="viaOrleans"/>.</summary>
    public async Task<ParameterVersion> Pull(string lane, string shard, long session, long step, Func<Task<ParameterVersion>> viaOrleans)
    {
        if (await Dial(lane) is not { } connection) return await viaOrleans();
        var answer = await Call(connection, PullKind, serializer.SerializeToArray(new LanePull(shard, session, step)), ReadOnlyMemory<byte>.Empty);
        return Read<ParameterVersion>(answer.Header) with { Parameters = answer.Payload ?? NoValues };
    }

    private async Task<LaneFrame> Call(LaneConnection connection, byte kind, byte[] header, ReadOnlyMemory<byte> payload)
    {
        Interlocked.Increment(ref _called);
        var answer = await connection.Call(kind, header, payload, messaging.Value.ResponseTimeout);
        if (answer.Kind == AnswerKind) return answer;
        answer.Payload?.Release();
        throw ReadError(answer.Header);
    }

    private Exception ReadError(byte[] header)
    {
        try
        {
            return Read<Exception>(header);
        }
        catch (Exception e)
        {
            return new InvalidDataException($"a data lane's error could not be read: {e.Message}");
        }
    }

    private Task<LaneConnection?> Dial(string lane)
    {
        lock (_dialled)
        {
            if (_dialled.TryGetValue(lane, out var known) &&
                (!known.Dialling.IsCompleted || known.Dialling.Result is { IsOpen: true } || (known.Dialling.Result is null && Environment.TickCount64 < known.RetryAfter)))
                return known.Dialling;
            if (_stopping.IsCancellationRequested) return Task.FromResult<LaneConnection?>(null);
            // On the thread pool, not the calling worker grain's scheduler: the connection's reader loop (started in
            // Connect) would otherwise run every answer of every worker on this silo in that one activation's turns.
            // Connect's failure path takes this lock, so it cannot overwrite the entry before it is set here.
            var dialling = Task.Run(() => Connect(lane));
            _dialled[lane] = (dialling, 0);
            return dialling;
        }
    }

    private async Task<LaneConnection?> Connect(string lane)
    {
        Socket? socket = null;
        try
        {
            var endpoint = IPEndPoint.Parse(lane);
            socket = new Socket(endpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token);
            timeout.CancelAfter(ConnectTimeout);
            await socket.ConnectAsync(endpoint, timeout.Token);
            return LaneConnection.Dialled(Configure(socket), lane);
        }
        catch (Exception e) when (e is SocketException or OperationCanceledException or FormatException)
        {
            socket?.Dispose();
            lock (_dialled) _dialled[lane] = (Task.FromResult<LaneConnection?>(null), Environment.TickCount64 + (long)RetryDialAfter.TotalMilliseconds);
            logger.LogWarning("Data lane: cannot connect to {Lane} ({Error}); its calls go through Orleans for {Seconds} s", lane, e.Message, RetryDialAfter.TotalSeconds);
            return null;
        }
    }

    private async Task Accept(Socket listener)
    {
        while (true)
        {
            Socket socket;
            try
            {
                socket = await listener.AcceptAsync(_stopping.Token);
            }
            catch (Exception) when (_stopping.IsCancellationRequested)
            {
                return;
            }
            catch (SocketException e)
            {
                logger.LogWarning("Data lane: accept failed ({Error})", e.Message);
                continue;
            }
            var connection = new LaneConnection(Configure(socket), socket.RemoteEndPoint?.ToString() ?? "?");
            _accepted[connection] = 0;
            _ = Serve(connection);
        }
    }

    private async Task Serve(LaneConnection connection)
    {
        // Not disposed: answers still running when the connection ends release it afterwards (Release on a disposed
        // SemaphoreSlim throws ObjectDisposedException, which would fault those fire-and-forget tasks unobserved).
        var inFlight = new SemaphoreSlim(MaxInFlight);
        try
        {
            while (true)
            {
                var frame = await connection.Read();
                if (frame.Kind is not (PushKind or PullKind))
                {
                    frame.Payload?.Release();
                    throw new InvalidDataException($"a request of kind {frame.Kind}");
                }
                await inFlight.WaitAsync(_stopping.Token);
                _ = Answer(connection, frame, inFlight);
            }
        }
        catch (Exception e)
        {
            if (e is InvalidDataException) logger.LogWarning("Data lane: closed the connection from {Peer}: {Error}", connection.Peer, e.Message);
        }
        finally
        {
            _accepted.TryRemove(connection, out _);
            connection.Close(null);
        }
    }

    /// <summary>Makes the request's grain call here and writes back its reply or exception.</summary>
    private async Task Answer(LaneConnection connection, LaneFrame request, SemaphoreSlim inFlight)
    {
        try
        {
            byte[] header;
            FloatPayload? values;
            try
            {
                if (request.Kind == PushKind)
                {
                    LanePush push;
                    try
                    {
                        push = Read<LanePush>(request.Header);
                    }
                    catch
                    {
                        request.Payload?.Release();
                        throw;
                    }
                    // The shard gives the gradient's array back to the pool; after a failed call it is left to the collector,
                    // since Orleans may still hold it for a call that went to another silo.
                    var reply = await grains.GetGrain<IParameterShardGrain>(push.Shard).Push(push.Push with { Gradient = request.Payload ?? NoValues });
                    values = reply.Next?.Parameters;
                    header = serializer.SerializeToArray(reply.Next is { } next ? reply with { Next = next with { Parameters = NoValues } } : reply);
                }
                else
                {
                    var pull = Read<LanePull>(request.Header);
                    var version = await grains.GetGrain<IParameterShardGrain>(pull.Shard).Pull(pull.Session, pull.Step);
                    values = version.Parameters;
                    header = serializer.SerializeToArray(version with { Parameters = NoValues });
                }
            }
            catch (Exception e)
            {
                await connection.Answer(ErrorKind, request.Id, ErrorHeader(e), ReadOnlyMemory<byte>.Empty);
                return;
            }
            try
            {
                await connection.Answer(AnswerKind, request.Id, header, values?.Bytes ?? ReadOnlyMemory<byte>.Empty);
                Interlocked.Increment(ref _served);
            }
            finally
            {
                values?.Release();   // only a payload that came from another silo is rented; a shard's own vector is not
            }
        }
        catch (Exception e)
        {
            // The connection broke while answering: its reader ends it, the caller's call fails.
            logger.LogDebug("Data lane: answering {Peer} failed ({Error})", connection.Peer, e.Message);
        }
        finally
        {
            inFlight.Release();
        }
    }

    private T Read<T>(byte[] header) => serializer.Deserialize<T>(header) ?? throw new InvalidDataException($"a data lane frame without its {typeof(T).Name}");

    private byte[] ErrorHeader(Exception error)
    {
        try
        {
            return serializer.SerializeToArray(error);
        }
        catch (Exception)
        {
            return serializer.SerializeToArray<Exception>(new InvalidOperationException($"{error.GetType().Name}: {error.Message}"));
        }
    }

    private static Socket Configure(Socket socket)
    {
        socket.NoDelay = true;
        // A peer host that dies without a word is noticed in about 8 s, not at the response timeout.
        socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true);
        socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime, 5);
        socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval, 1);
        socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount, 3);
        return socket;
    }

    /// <summary>Tests only: breaks every connection this silo dialled or accepted, as a network fault would.</summary>
    internal void BreakConnectionsForTests()
    {
        foreach (var connection in _accepted.Keys) connection.Close(new IOException("broken by a test"));
        lock (_dialled)
            foreach (var (dialling, _) in _dialled.Values)
                if (dialling.IsCompletedSuccessfully) dialling.Result?.Close(new IOException("broken by a test"));
    }

    public ValueTask DisposeAsync()
    {
        if (_stopping.IsCancellationRequested) return ValueTask.CompletedTask;
        _stopping.Cancel();
        _listener?.Dispose();
        Endpoint = null;
        var closed = new IOException("the silo's data lane stopped");
        foreach (var connection in _accepted.Keys) connection.Close(closed);
        lock (_dialled)
            foreach (var (dialling, _) in _dialled.Values)
                if (dialling.IsCompletedSuccessfully) dialling.Result?.Close(closed);
        return ValueTask.CompletedTask;
    }
}
