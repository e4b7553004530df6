using System.Collections.Concurrent;
using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using Backprop.Grains.Messages;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Orleans.Configuration;
using Orleans.Serialization;

namespace Backprop.Grains.Hosting;

/// <summary>Where a silo's data lane listens: <see cref="Port"/> 0 any free port, −1 none (every push and pull goes through Orleans).</summary>
public sealed class LaneOptions
{
    public int Port { get; set; }
}

/// <summary>
/// A silo's data lane: TCP connections of its own, one per pair of silos, that carry a worker's pushes to and pulls
/// from a shard on another silo beside Orleans' connection, at the raw-TCP floor (bench/README "Wire": Orleans moves
/// a vector at about half of it, through three threads and two copies). Only the transport changes: the lane's end on
/// the shard's silo makes the same grain call there (<see cref="IParameterShardGrain.Push"/>, <see cref="IParameterShardGrain.Pull"/>),
/// a local one where the shard lives, and writes back the reply or the exception, so fencing, sessions, duplicates and
/// redos are the grain's as before. A frame is a 17-byte prefix (kind, request id, header and payload byte counts),
/// the header (the message without its vector, in Orleans' format) and the vector as raw little-endian floats, read
/// straight into a pooled payload array.
/// <list type="bullet">
/// <item>A worker uses a lane only where a shard's reply named one and it is connected; until then (dialling in the
/// background, or backing off after a failed dial: 1 s doubling to a minute) the call goes through Orleans.</item>
/// <item>A lane accepts only connections from the addresses of its cluster's silos (and greets them with one byte
/// first, so that a refused dialler falls back instead of failing calls); it holds at most 1 GiB of requests its
/// shards have not taken yet, reads a frame's bytes only once they fit, and closes a connection whose frame is out of
/// bounds or does not arrive within the response timeout.</item>
/// <item>A connection that breaks fails the calls waiting on it (the coordinator redoes their blocks); a call gives up
/// after the response timeout, but a frame once started is sent whole (within twice that).</item>
/// <item>Lanes of silos the membership declares dead are closed and forgotten, and so are lanes at addresses where no
/// silo is known once their connection ended: the table of dialled lanes does not grow with the silos that came and went.</item>
/// <item>Under TLS (<see cref="LaneTls"/>) every lane connection is TLS with the silo's certificate both ways and the
/// checks of its silo connections. Off with <see cref="LaneOptions.Port"/> −1 and on the CLI's embedded silo (one silo:
/// every shard is local).</item>
/// </list>
/// </summary>
public sealed class DataLane(IOptions<LaneOptions> options, ILocalSiloDetails silo, IGrainFactory grains, Serializer serializer,
    IOptions<SiloMessagingOptions> messaging, IClusterMembershipService membership, ILogger<DataLane> logger, LaneTls? tls = null) : ILifecycleParticipant<ISiloLifecycle>, IAsyncDisposable
{
    internal const byte PushKind = 1, PullKind = 2, AnswerKind = 3, ErrorKind = 4;
    /// <summary>The byte a lane sends a silo it accepts: a dialler that reads anything else (or nothing) falls back to Orleans.</summary>
    internal const byte Accepted = 0x42;
    /// <summary>Bytes of requests this silo holds before their shards took them (a peer cannot pile up more; legal ones stay far below).</summary>
    internal const long BudgetBytes = 1L << 30;
    /// <summary>How long a dial (connect, TLS handshake, greeting) or an accepted connection's TLS handshake may take.</summary>
    private static readonly TimeSpan ConnectTimeout = TimeSpan.FromSeconds(5);
    /// <summary>How long a lane that could not be dialled is passed over (its calls go through Orleans) the first time; doubled up to a minute.</summary>
    private static readonly TimeSpan RetryDialAfter = TimeSpan.FromSeconds(1);
    private static readonly TimeSpan MaxRetryDialAfter = TimeSpan.FromMinutes(1);
    private static readonly FloatPayload NoValues = new(Array.Empty<float>());

    private readonly CancellationTokenSource _stopping = new();
    private readonly ByteBudget _budget = new(BudgetBytes);
    private Socket? _listener;
    private readonly ConcurrentDictionary<LaneConnection, byte> _accepted = new();
    private readonly Dictionary<string, Dialled> _dialled = new();
    private long _served, _called;

    /// <summary>A lane this silo dials: its connection once made (or being made), and when to try again after failures.</summary>
    private sealed class Dialled
    {
        public Task<LaneConnection?> Connecting = Task.FromResult<LaneConnection?>(null);
        public long RetryAt, ConnectedAt;
        public int Failures;
        /// <summary>Taken out of the table (its silo died): a dial still in flight closes what it makes.</summary>
        public bool Forgotten;
        /// <summary>The connection a dial made, as soon as it is made (before <see cref="Connecting"/> completes).</summary>
        public LaneConnection? Made;

        /// <summary>Passes the lane over for 1 s, doubled with each failure in a row up to a minute; returns how long.</summary>
        public TimeSpan BackOff()
        {
            var wait = TimeSpan.FromTicks(Math.Min(MaxRetryDialAfter.Ticks, RetryDialAfter.Ticks << Math.Min(Failures++, 10)));
            RetryAt = Environment.TickCount64 + (long)wait.TotalMilliseconds;
            return wait;
        }
    }

    /// <summary>A connection that ends sooner than this after its greeting, without an answer or with calls waiting, counts as a failed dial.</summary>
    private static readonly TimeSpan ShortLived = TimeSpan.FromSeconds(10);

    private TimeSpan SendLimit => 2 * messaging.Value.ResponseTimeout;

    /// <summary>Where this silo's lane listens, "address:port"; null while it has none.</summary>
    public string? Endpoint { get; private set; }
    /// <summary>Requests this silo's lane answered, and requests this silo sent through lanes: for tests and the bench.</summary>
    public long Served => Interlocked.Read(ref _served);
    public long Called => Interlocked.Read(ref _called);

    /// <summary>Tests only: bytes of the budget not held by a request now.</summary>
    internal long BudgetFreeForTests => _budget.Free;

    public void Participate(ISiloLifecycle lifecycle) =>
        lifecycle.Subscribe(nameof(DataLane), ServiceLifecycleStage.Active, _ => Start(), _ => DisposeAsync().AsTask());

    private Task Start()
    {
        // Whether or not this silo listens, its workers dial the lanes of others.
        _ = ForgetLeftSilos();
        if (options.Value.Port < 0)
        {
            logger.LogInformation("Data lane off (its port is -1): payloads go through Orleans");
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

    private async Task ForgetLeftSilos()
    {
        try
        {
            await foreach (var snapshot in membership.MembershipUpdates.WithCancellation(_stopping.Token))
                try
                {
                    Forget(snapshot);
                }
                catch (Exception e)
                {
                    logger.LogWarning("Data lane: could not forget the lanes of silos that left ({Error})", e.Message);
                }
        }
        catch (OperationCanceledException) when (_stopping.IsCancellationRequested)
        {
        }
        catch (Exception e)
        {
            logger.LogWarning("Data lane: stopped following the membership ({Error}); lanes of silos that leave are no longer forgotten", e.Message);
        }
    }

    /// <summary>
    /// Closes and forgets the lanes at addresses where a silo died and none lives now (dialled or accepted: a host that
    /// vanished would hold them until keep-alive gave up), and forgets ended lanes at addresses no silo has.
    /// A lane at an address not yet in this silo's view is left alone while it is open or being dialled.
    /// </summary>
    internal void Forget(ClusterMembershipSnapshot snapshot)
    {
        var live = new HashSet<IPAddress>();
        var dead = new HashSet<IPAddress>();
        foreach (var member in snapshot.Members.Values)
            (member.Status == SiloStatus.Dead ? dead : live).Add(Plain(member.SiloAddress.Endpoint.Address));
        bool Died(IPAddress? address) => address is not null && dead.Contains(address) && !live.Contains(address);
        lock (_dialled)
            foreach (var (lane, known) in _dialled.ToList())
            {
                var address = IPEndPoint.TryParse(lane, out var endpoint) ? Plain(endpoint.Address) : null;
                if (address is not null && live.Contains(address)) continue;
                var connection = known.Connecting.IsCompletedSuccessfully ? known.Connecting.Result : known.Made;
                if (Died(address)) connection?.Close(new IOException($"the silo at {address} left the cluster"));
                // Unknown address: kept while in use, being dialled, or backing off (its back-off would be lost).
                else if (!known.Connecting.IsCompleted || connection is { IsOpen: true } || Environment.TickCount64 < known.RetryAt) continue;
                known.Forgotten = true;
                _dialled.Remove(lane);
            }
        foreach (var connection in _accepted.Keys)
            if (Died(IPEndPoint.TryParse(connection.Peer, out var peer) ? Plain(peer.Address) : null))
                connection.Close(new IOException($"the silo at {connection.Peer} left the cluster"));
    }

    private static IPAddress Plain(IPAddress address) => address.IsIPv4MappedToIPv6 ? address.MapToIPv4() : address;

    /// <summary>Shard <paramref name="shard"/>'s push through the lane at <paramref name="lane"/>, or <paramref name="viaOrleans"/> when it cannot be dialled.</summary>
    public async Task<PushReply> Push(string lane, string shard, GradientPush push, Func<Task<PushReply>> viaOrleans)
    {
        if (Dial(lane) is not { } connection) return await Fallback(viaOrleans);
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
        if (Dial(lane) is not { } connection) return await Fallback(viaOrleans);
        var answer = await Call(connection, PullKind, serializer.SerializeToArray(new LanePull(shard, session, step)), ReadOnlyMemory<byte>.Empty);
        return Read<ParameterVersion>(answer.Header) with { Parameters = answer.Payload ?? NoValues };
    }

    private static Task<T> Fallback<T>(Func<Task<T>> viaOrleans)
    {
        BackpropMetrics.LaneFallback();
        return viaOrleans();
    }

    private async Task<LaneFrame> Call(LaneConnection connection, byte kind, byte[] header, ReadOnlyMemory<byte> payload)
    {
        Interlocked.Increment(ref _called);
        BackpropMetrics.LaneCall(served: false);
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

    /// <summary>
    /// The open connection to <paramref name="lane"/>, or null while there is none: then a dial is started in the
    /// background (unless the last one failed too recently) and the caller goes through Orleans, so a lane that is slow
    /// to answer or gone never holds a step up.
    /// </summary>
    private LaneConnection? Dial(string lane)
    {
        lock (_dialled)
        {
            if (!_dialled.TryGetValue(lane, out var known)) _dialled[lane] = known = new Dialled();
            if (known.Connecting.IsCompletedSuccessfully && known.Connecting.Result is { } connection)
            {
                if (connection.IsOpen) return connection;
                // Closed: judged once, like a dial. A failure (backed off, its calls go through Orleans meanwhile): a peer
                // that stopped answering, or one that died soon after its greeting without an answer or with calls
                // waiting (a peer dropping every frame, or all but one, is not redialled and its calls failed step after
                // step). Otherwise (it lived, or closed idle) it is redialled at once.
                known.Connecting = Task.FromResult<LaneConnection?>(null);
                bool young = Environment.TickCount64 - known.ConnectedAt < (long)ShortLived.TotalMilliseconds;
                if (connection.StoppedAnswering || (young && (!connection.Answered || connection.CutWithCallsWaiting))) known.BackOff();
                else (known.Failures, known.RetryAt) = (0, 0);
            }
            if (known.Connecting.IsCompleted && Environment.TickCount64 >= known.RetryAt && !_stopping.IsCancellationRequested)
                // On the thread pool, not the calling worker grain's scheduler: the connection's reader loop (started in
                // Connect) would otherwise run every answer of every worker on this silo in that one activation's turns.
                known.Connecting = Task.Run(() => Connect(lane, known));
            return null;
        }
    }

    /// <summary>Tests only: dials <paramref name="lane"/> now (a back-off left by an earlier test set aside) and says whether it is open.</summary>
    internal async Task<bool> DialForTests(string lane)
    {
        lock (_dialled)
            if (_dialled.TryGetValue(lane, out var known))
            {
                // A closed connection is set aside too: Dial would judge it first, and one that died young without an
                // answer would set a new back-off after this reset, so no dial would start.
                if (known.Connecting.IsCompletedSuccessfully && known.Connecting.Result is { IsOpen: false })
                    known.Connecting = Task.FromResult<LaneConnection?>(null);
                (known.RetryAt, known.Failures) = (0, 0);
            }
        Dial(lane);
        Task<LaneConnection?> connecting;
        lock (_dialled) connecting = _dialled[lane].Connecting;
        return await connecting is { IsOpen: true };
    }

    private async Task<LaneConnection?> Connect(string lane, Dialled known)
    {
        Socket? socket = null;
        Stream? stream = null;
        try
        {
            var endpoint = IPEndPoint.Parse(lane);
            socket = new Socket(endpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            // From this silo's own address (where its lane listens, so it is local): the peer accepts only members'
            // addresses, and a host with several addresses would otherwise pick the source by its routes.
            if (_listener?.LocalEndPoint is IPEndPoint own && own.AddressFamily == endpoint.AddressFamily)
                socket.Bind(new IPEndPoint(own.Address, 0));
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token);
            timeout.CancelAfter(ConnectTimeout);
            await socket.ConnectAsync(endpoint, timeout.Token);
            stream = new NetworkStream(Configure(socket), ownsSocket: true);
            if (tls is not null)
            {
                var ssl = new SslStream(stream, leaveInnerStreamOpen: false);
                stream = ssl;
                await ssl.AuthenticateAsClientAsync(tls.Client(endpoint), timeout.Token);
            }
            // The lane says it accepts this silo (a member of its cluster) before anything is sent.
            var accepted = new byte[1];
            if (await stream.ReadAsync(accepted, timeout.Token) != 1 || accepted[0] != Accepted)
                throw new IOException("the lane did not greet this silo");
            var connection = LaneConnection.Dialled(stream, lane, SendLimit);
            logger.LogInformation("Data lane: connected to {Lane}{Tls}", lane, tls is null ? "" : " (TLS)");
            lock (_dialled)
            {
                (known.ConnectedAt, known.Made) = (Environment.TickCount64, connection);
                // Stopped meanwhile: DisposeAsync closed the connections it saw, not this one; forgotten: no one would close it.
                if (_stopping.IsCancellationRequested) connection.Close(new IOException("the silo's data lane stopped"));
                else if (known.Forgotten) connection.Close(new IOException($"the silo of {lane} left the cluster"));
            }
            return connection;
        }
        catch (Exception e)
        {
            // Any failure (not only socket errors: a bad endpoint, a socket option the platform lacks) backs off; one that
            // escaped would leave RetryAt unset, so every later call would dial again, and fault a task no one observes.
            stream?.Dispose();
            socket?.Dispose();
            TimeSpan wait;
            lock (_dialled) wait = known.BackOff();
            logger.LogWarning("Data lane: cannot connect to {Lane} ({Error}); its calls go through Orleans for {Seconds} s", lane, e.Message, wait.TotalSeconds);
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
                // Out of file descriptors and the like: not a reason to spin.
                logger.LogWarning("Data lane: accept failed ({Error})", e.Message);
                await Task.Delay(100);
                continue;
            }
            var remote = (socket.RemoteEndPoint as IPEndPoint)?.Address;
            if (remote is null || !IsMember(remote))
            {
                logger.LogWarning("Data lane: refused a connection from {Remote}, not a silo of this cluster", socket.RemoteEndPoint);
                socket.Dispose();
                continue;
            }
            _ = Serve(Configure(socket), socket.RemoteEndPoint!.ToString()!);
        }
    }

    /// <summary>Whether <paramref name="address"/> is that of a silo of this cluster that is not dead, as this silo knows it now.</summary>
    private bool IsMember(IPAddress address)
    {
        address = Plain(address);
        return membership.CurrentSnapshot.Members.Values.Any(m => m.Status is SiloStatus.Active or SiloStatus.Joining or SiloStatus.Created
            && m.SiloAddress.Endpoint.Address.Equals(address));
    }

    private async Task Serve(Socket socket, string peer)
    {
        Stream stream = new NetworkStream(socket, ownsSocket: true);
        LaneConnection? connection = null;
        try
        {
            if (tls is not null)
            {
                var ssl = new SslStream(stream, leaveInnerStreamOpen: false);
                stream = ssl;
                using var handshake = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token);
                handshake.CancelAfter(ConnectTimeout);
                await ssl.AuthenticateAsServerAsync(tls.Server, handshake.Token);
            }
            connection = new LaneConnection(stream, peer, SendLimit);
            _accepted[connection] = 0;
            if (_stopping.IsCancellationRequested) return;   // stopped during the handshake: DisposeAsync did not see it
            await connection.Greet(Accepted);
            while (true)
            {
                var frame = await connection.Read(_budget, messaging.Value.ResponseTimeout, _stopping.Token);
                if (frame.Kind is not (PushKind or PullKind))
                {
                    frame.Payload?.Release();
                    _budget.Give(frame.Budgeted);
                    throw new InvalidDataException($"a request of kind {frame.Kind}");
                }
                _ = Answer(connection, frame);
            }
        }
        catch (Exception e)
        {
            // A refused certificate is logged with its reason by the TLS checks; other ends before serving (a handshake
            // that failed or timed out, a plaintext dialler of a TLS lane) are named here.
            if (e is InvalidDataException) logger.LogWarning("Data lane: closed the connection from {Peer}: {Error}", peer, e.Message);
            else if (connection is null && !_stopping.IsCancellationRequested)
                logger.LogWarning("Data lane: the connection from {Peer} ended before it was served ({Error})", peer, e.Message);
        }
        finally
        {
            if (connection is null)
            {
                stream.Dispose();
            }
            else
            {
                _accepted.TryRemove(connection, out _);
                connection.Close(null);
            }
        }
    }

    /// <summary>Makes the request's grain call here and writes back its reply or exception.</summary>
    private async Task Answer(LaneConnection connection, LaneFrame request)
    {
        // The request's bytes go back to the budget once the shard has taken its vector in (it gives the array back
        // at once, before it waits for the rest of the step), or when the call ends, whichever comes first.
        int given = 0;
        void GiveBack()
        {
            if (Interlocked.Exchange(ref given, 1) == 0) _budget.Give(request.Budgeted);
        }
        request.Payload?.OnRelease(GiveBack);
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
                GiveBack();
                await connection.Answer(ErrorKind, request.Id, ErrorHeader(e), ReadOnlyMemory<byte>.Empty);
                return;
            }
            GiveBack();
            try
            {
                await connection.Answer(AnswerKind, request.Id, header, values?.Bytes ?? ReadOnlyMemory<byte>.Empty);
                Interlocked.Increment(ref _served);
                BackpropMetrics.LaneCall(served: true);
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
            foreach (var known in _dialled.Values)
                if (known.Connecting.IsCompletedSuccessfully) known.Connecting.Result?.Close(new IOException("broken by a test"));
    }

    /// <summary>Tests only: whether this silo knows the lane (has dialled it and not forgotten it).</summary>
    internal bool KnowsForTests(string lane)
    {
        lock (_dialled) return _dialled.ContainsKey(lane);
    }

    /// <summary>Tests only: whether the lane's connection is open, and whether the lane is passed over for now (backing off).</summary>
    internal (bool Open, bool BackingOff) StateForTests(string lane)
    {
        lock (_dialled)
            return _dialled.TryGetValue(lane, out var known)
                ? (known.Connecting.IsCompletedSuccessfully && known.Connecting.Result is { IsOpen: true }, Environment.TickCount64 < known.RetryAt)
                : (false, false);
    }

    public ValueTask DisposeAsync()
    {
        if (_stopping.IsCancellationRequested) return ValueTask.CompletedTask;
        // Stopping first: the accept loop then ends quietly when its listener goes (it took that for a failed accept,
        // logged it and tried again, or faulted with no one to observe it).
        lock (_dialled) _stopping.Cancel();
        _listener?.Dispose();
        Endpoint = null;
        var closed = new IOException("the silo's data lane stopped");
        foreach (var connection in _accepted.Keys) connection.Close(closed);
        lock (_dialled)
        {
            foreach (var known in _dialled.Values)
                if (known.Connecting.IsCompletedSuccessfully) known.Connecting.Result?.Close(closed);
        }
        return ValueTask.CompletedTask;
    }
}
