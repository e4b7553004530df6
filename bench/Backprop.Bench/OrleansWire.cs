using System.Diagnostics;
using System.Net;
using Backprop.Grains.Hosting;
using Backprop.Grains.Messages;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Orleans.Placement;

namespace Backprop.Bench;

/// <summary>Sends a payload back of the length it was sent (the other end of `wire`'s Orleans round trip).</summary>
public interface IWireEchoGrain : IGrainWithStringKey
{
    Task<FloatPayload> Echo(FloatPayload payload);
}

/// <summary>
/// Placed on the silo that first calls it, so the bench can put it on the second silo. Answers from a vector it holds
/// (no copy, as the raw-TCP floor echoes from its buffer) and gives the received one back to the pool at once.
/// </summary>
[PreferLocalPlacement]
public sealed class WireEchoGrain : Grain, IWireEchoGrain
{
    private float[] _reply = [];

    public Task<FloatPayload> Echo(FloatPayload payload)
    {
        int length = payload.Length;
        payload.Release();
        if (_reply.Length != length) _reply = new float[length];
        return Task.FromResult(new FloatPayload(_reply));
    }
}

/// <summary>
/// Two silos in this process on 127.0.0.1, the cluster's silo-to-silo path: a call from the first silo's grain
/// factory to an echo grain on the second carries the vector each way through Orleans' connection (message framing,
/// the payload codec, its pipes and socket), measured the way the raw-TCP floor is: one connection, round trips in turn.
/// With <c>largeBlocks</c> the silos are configured as the product's (<see cref="ConnectionBlocks"/>), else with Orleans' own pool; either way
/// the second silo dialled the first to join and the first accepted, so only the first silo's reads (the replies) use the blocks.
/// </summary>
internal sealed class OrleansWire : IAsyncDisposable
{
    private readonly IHost _first, _second;

    private OrleansWire(IHost first, IHost second) => (_first, _second) = (first, second);

    public static async Task<OrleansWire> Start(bool largeBlocks)
    {
        var taken = new HashSet<int>();
        int Port() { int p; do p = LocalClustering.FreePort(); while (!taken.Add(p)); return p; }
        var primary = new IPEndPoint(IPAddress.Loopback, Port());
        IHost Silo(int siloPort, int gatewayPort) => Host.CreateDefaultBuilder()
            .ConfigureLogging(l => l.ClearProviders())
            .UseOrleans(silo =>
            {
                silo.UseLocalhostClustering(siloPort, gatewayPort, primary, "backprop-wire-bench", $"wire-{Environment.ProcessId}-{primary.Port}");
                if (largeBlocks) silo.Services.AddLargeConnectionBlocks();
            })
            .Build();
        var first = Silo(primary.Port, Port());
        try
        {
            await first.StartAsync();
        }
        catch
        {
            first.Dispose();
            throw;
        }
        var second = Silo(Port(), Port());
        try
        {
            await second.StartAsync();
        }
        catch
        {
            second.Dispose();
            try { await first.StopAsync(); } finally { first.Dispose(); }
            throw;
        }
        var wire = new OrleansWire(first, second);
        try
        {
            // Activated from the second silo, so on it: every call from the first crosses the connection.
            await Grains(second).GetGrain<IWireEchoGrain>("echo").Echo(new FloatPayload([0f]));
        }
        catch
        {
            await wire.DisposeAsync();
            throw;
        }
        return wire;
    }

    private static IGrainFactory Grains(IHost host) => host.Services.GetRequiredService<IGrainFactory>();

    /// <summary>Round trips of <paramref name="floats"/> floats each way, first silo to second and back, after warm-up.</summary>
    public async Task<double[]> RoundTrips(int floats, int rounds, int warmup)
    {
        var echo = Grains(_first).GetGrain<IWireEchoGrain>("echo");
        var payload = new FloatPayload(new float[floats]);
        var times = new double[rounds];
        for (int i = 0; i < rounds + warmup; i++)
        {
            long start = Stopwatch.GetTimestamp();
            var reply = await echo.Echo(payload);
            if (reply.Length != floats) throw new InvalidOperationException($"echo sent {reply.Length} floats for {floats}");
            reply.Release();
            if (i >= warmup) times[i - warmup] = Stopwatch.GetElapsedTime(start).TotalSeconds;
        }
        return times;
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            await _second.StopAsync();
        }
        finally
        {
            _second.Dispose();
            try { await _first.StopAsync(); } finally { _first.Dispose(); }
        }
    }
}
