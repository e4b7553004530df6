using System.Buffers;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using Backprop.Grains.Messages;
using Microsoft.Extensions.DependencyInjection;
using Orleans.Serialization;

namespace Backprop.Bench;

/// <summary>
/// `bench wire`: what moving a parameter vector costs below the cluster. The payload codec alone (Orleans'
/// serializer with <see cref="FloatPayloadCodec"/>: a <see cref="ParameterVersion"/> written to a reused buffer
/// and read back into a pooled array, one thread), and the floor under any transport on this machine: the same
/// bytes sent over a loopback TCP connection and echoed back (a push and its reply); and what Orleans makes of that
/// floor, the same round trip as a grain call between two silos (<see cref="OrleansWire"/>). Medians of timed rounds.
/// </summary>
public static class WireBench
{
    public const string Usage = """
        usage: Backprop.Bench wire [--json] [--rounds N]

        Serialize + deserialize GB/s (the vector's bytes through both, per second) of a parameter vector (784-128-64-10: 109,386 floats; 784-1024-1024-10:
        1,863,690) through this project's payload codec on one thread, and the raw TCP round trip of the same bytes
        on 127.0.0.1 (send, echo back; GB/s counts both directions), and the same round trip between two silos in this
        process through Orleans (a grain call from the first to an echo grain on the second, the path of a push and its
        reply), with the product's connection blocks and with Orleans' own, in turn. --rounds: timed rounds each (default 200).
        """;

    public static async Task<int> Run(string[] args)
    {
        if (args.Contains("--help") || args.Contains("-h"))
        {
            Console.WriteLine(Usage);
            return 0;
        }
        bool json = args.Contains("--json");
        int rounds = 200;
        if (Array.IndexOf(args, "--rounds") is var r and >= 0)
            rounds = r + 1 < args.Length && int.TryParse(args[r + 1], out int n) && n > 0 ? n : throw new ArgumentException("--rounds: needs a positive integer");

        await using var orleans = await OrleansWire.Start(largeBlocks: true);
        await using var orleansDefault = await OrleansWire.Start(largeBlocks: false);
        using var services = new ServiceCollection().AddSerializer(b => b.AddAssembly(typeof(FloatPayload).Assembly)).BuildServiceProvider();
        var serializer = services.GetRequiredService<Serializer<ParameterVersion>>();
        foreach (var (model, floats) in new[] { ("784-128-64-10", 109_386), ("784-1024-1024-10", 1_863_690) })
        {
            var values = new float[floats];
            new Random(1).NextBytes(System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()));
            for (int i = 0; i < values.Length; i++) if (!float.IsFinite(values[i])) values[i] = i;
            long bytes = (long)floats * sizeof(float);

            var version = new ParameterVersion(7, new FloatPayload(values));
            var buffer = new ArrayBufferWriter<byte>(checked((int)bytes + 256));
            double[] codec = Time(rounds, () =>
            {
                buffer.ResetWrittenCount();
                serializer.Serialize(version, buffer);
                var back = serializer.Deserialize(buffer.WrittenMemory)!;
                if (back.Parameters.Length != floats) throw new InvalidOperationException("codec lost values");
                back.Parameters.Release();
            });
            double[] tcp = await EchoRoundTrips(bytes, rounds);
            // The two silo pairs take turns, so that drift of the machine hits both alike; the four turns add up to --rounds.
            var (grains, grainsDefault) = (new List<double>(), new List<double>());
            for (int part = 0; part < 4; part++)
            {
                int turn = rounds / 4 + (part < rounds % 4 ? 1 : 0);
                grains.AddRange(await orleans.RoundTrips(floats, turn, Warmup));
                grainsDefault.AddRange(await orleansDefault.RoundTrips(floats, turn, Warmup));
            }
            double codecGbps = bytes / Median(codec) / 1e9, tcpGbps = 2.0 * bytes / Median(tcp) / 1e9;
            double orleansGbps = 2.0 * bytes / Median(grains) / 1e9, orleansDefaultGbps = 2.0 * bytes / Median(grainsDefault) / 1e9;
            if (json)
                Console.WriteLine(JsonSerializer.Serialize(new
                {
                    bench = "wire", model, floats, bytes, rounds,
                    codecSerializeDeserializeMicroseconds = Median(codec) * 1e6, codecGBps = codecGbps,
                    tcpEchoRoundTripMicroseconds = Median(tcp) * 1e6, tcpGBps = tcpGbps,
                    orleansEchoRoundTripMicroseconds = Median(grains) * 1e6, orleansGBps = orleansGbps,
                    orleansDefaultBlocksEchoRoundTripMicroseconds = Median(grainsDefault) * 1e6, orleansDefaultBlocksGBps = orleansDefaultGbps,
                    vectorWidth = System.Numerics.Vector<float>.Count * 32,
                }));
            else
                Console.WriteLine($"{model} ({bytes / 1024.0:F0} KB): codec serialize+deserialize {Median(codec) * 1e6:F0} us = {codecGbps:F2} GB/s on one thread; "
                    + $"raw TCP loopback send+echo {Median(tcp) * 1e6:F0} us = {tcpGbps:F2} GB/s (both directions); "
                    + $"silo to silo through Orleans {Median(grains) * 1e6:F0} us = {orleansGbps:F2} GB/s ({orleansGbps / tcpGbps:F2}x raw TCP; "
                    + $"with Orleans' 4 KB blocks {Median(grainsDefault) * 1e6:F0} us = {orleansDefaultGbps:F2} GB/s)");
        }
        return 0;
    }

    /// <summary>The raw-TCP floor for a vector of <paramref name="bytes"/>: GB/s of the median loopback round trip, both directions counted.</summary>
    internal static async Task<double> TcpFloorGBps(long bytes, int rounds) => 2.0 * bytes / Median(await EchoRoundTrips(bytes, rounds)) / 1e9;

    /// <summary>Round trips of <paramref name="bytes"/> each way over one loopback connection: sent, echoed back, fully read.</summary>
    private static async Task<double[]> EchoRoundTrips(long bytes, int rounds)
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        using var client = new TcpClient { NoDelay = true };
        await client.ConnectAsync(IPAddress.Loopback, ((IPEndPoint)listener.LocalEndpoint).Port);
        using var server = await listener.AcceptTcpClientAsync();
        server.NoDelay = true;
        var send = new byte[bytes];
        var receive = new byte[bytes];
        var echo = new byte[bytes];
        var serverStream = server.GetStream();
        var clientStream = client.GetStream();
        var echoing = Task.Run(async () =>
        {
            for (int i = 0; i < rounds + Warmup; i++)
            {
                await serverStream.ReadExactlyAsync(echo);
                await serverStream.WriteAsync(echo);
            }
        });
        var times = new double[rounds];
        for (int i = 0; i < rounds + Warmup; i++)
        {
            long start = Stopwatch.GetTimestamp();
            var writing = clientStream.WriteAsync(send).AsTask();
            await clientStream.ReadExactlyAsync(receive);
            await writing;
            if (i >= Warmup) times[i - Warmup] = Stopwatch.GetElapsedTime(start).TotalSeconds;
        }
        await echoing;
        return times;
    }

    private const int Warmup = 20;

    private static double[] Time(int rounds, Action action)
    {
        for (int i = 0; i < Warmup; i++) action();
        var times = new double[rounds];
        for (int i = 0; i < rounds; i++)
        {
            long start = Stopwatch.GetTimestamp();
            action();
            times[i] = Stopwatch.GetElapsedTime(start).TotalSeconds;
        }
        return times;
    }

    private static double Median(IReadOnlyCollection<double> values)
    {
        var sorted = values.Order().ToArray();
        return sorted[sorted.Length / 2];
    }
}
