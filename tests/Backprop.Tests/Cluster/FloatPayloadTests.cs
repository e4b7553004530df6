using System.Runtime.InteropServices;
using Backprop.Grains.Messages;
using Microsoft.Extensions.DependencyInjection;
using Orleans.Serialization;

namespace Backprop.Tests.Cluster;

/// <summary>
/// The pooled arrays of received payloads have one owner: <see cref="FloatPayload.Pool"/> lends them (through
/// <see cref="FloatPayload.Rent"/>, which the codec uses for every payload it reads) and <see cref="FloatPayload.Release"/>
/// alone takes one back, exactly once however often or from however many threads it is called, and never takes a
/// caller's array. Whether an array is in the pool, and how often, is seen from outside: the pool is drained of its
/// bucket first (so a returned array is kept, not dropped from a full bucket), then everything it lends of that size
/// until it has to allocate is counted. The pool is the process's, so these tests run alone (no other test rents or
/// returns meanwhile) and use a size the other tests' payloads do not.
/// </summary>
[Collection(nameof(FloatPayloadPool))]
public sealed class FloatPayloadTests
{
    /// <summary>Floats of the payloads here: an 8,192-float bucket of the pool, which no other test's vectors use.</summary>
    private const int Length = 5_000;

    /// <summary>More than the pool keeps of one size (16 per bucket): renting this many empties a bucket for sure.</summary>
    private const int MoreThanABucket = 24;

    private static readonly IServiceProvider Services = new ServiceCollection()
        .AddSerializer(b => b.AddAssembly(typeof(FloatPayload).Assembly)).BuildServiceProvider();

    /// <summary>
    /// Rents until the pool has nothing left of this size, and keeps what it got until disposed (then all of it goes back).
    /// Arrays returned meanwhile are the only ones in the bucket: <see cref="Lent"/> finds each as often as it went back.
    /// </summary>
    private sealed class Drained : IDisposable
    {
        private readonly List<float[]> _held = Enumerable.Range(0, MoreThanABucket).Select(_ => FloatPayload.Pool.Rent(Length)).ToList();

        /// <summary>
        /// How many times the pool lends <paramref name="array"/> before it runs out of its size. The array is held from
        /// then on (given back once on dispose); the others lent here are left to the collector, so the bucket stays empty.
        /// </summary>
        /// <param name="rents">More than the arrays given back since the drain (by default, more than a bucket holds).</param>
        public int Lent(float[] array, int rents = MoreThanABucket)
        {
            int times = Enumerable.Range(0, rents).Select(_ => FloatPayload.Pool.Rent(Length)).Count(a => ReferenceEquals(a, array));
            if (times > 0) _held.Add(array);
            return times;
        }

        public bool Holds(float[] array) => _held.Any(a => ReferenceEquals(a, array));

        public void Dispose()
        {
            foreach (var a in _held.Distinct(ReferenceEqualityComparer.Instance).Cast<float[]>()) FloatPayload.Pool.Return(a);
        }
    }

    private static float[] ArrayOf(FloatPayload payload)
    {
        Assert.True(MemoryMarshal.TryGetArray(payload.Memory, out var segment), "a payload's values are not an array");
        return segment.Array!;
    }

    private static float[] Values(int length) => Enumerable.Range(0, length).Select(i => i * 0.5f - 7).ToArray();

    [Fact]
    public void A_rented_payload_released_twice_gives_its_array_back_once_and_tells_its_owner_once()
    {
        using var pool = new Drained();
        var payload = FloatPayload.Rent(Length);
        var array = ArrayOf(payload);
        Assert.False(pool.Holds(array));
        Assert.Equal(Length, payload.Length);
        Assert.True(array.Length >= Length);
        int released = 0;
        payload.OnRelease(() => Interlocked.Increment(ref released));

        payload.Release();
        Assert.Equal(1, released);
        Assert.Equal(0, payload.Length);   // the values are gone with the array
        Assert.True(payload.Filling.IsEmpty);
        payload.Release();
        Assert.Equal(1, released);
        Assert.Equal(1, pool.Lent(array));
    }

    [Fact]
    public void Two_threads_releasing_one_payload_at_once_give_its_array_back_once_and_tell_its_owner_once()
    {
        using var pool = new Drained();
        const int Rounds = 5_000;
        using var barrier = new Barrier(3);
        using var stop = new CancellationTokenSource();   // a failed round lets the releasing threads go
        FloatPayload? payload = null;
        var threads = Enumerable.Range(0, 2).Select(_ => new Thread(() =>
        {
            try
            {
                for (int round = 0; round < Rounds; round++)
                {
                    barrier.SignalAndWait(stop.Token);   // the payload of this round is set
                    payload!.Release();
                    barrier.SignalAndWait(stop.Token);   // both have released it
                }
            }
            catch (OperationCanceledException) { }
        }) { IsBackground = true }).ToList();
        threads.ForEach(t => t.Start());
        try
        {
            for (int round = 0; round < Rounds; round++)
            {
                payload = FloatPayload.Rent(Length);
                var array = ArrayOf(payload);
                int released = 0;
                payload.OnRelease(() => Interlocked.Increment(ref released));
                barrier.SignalAndWait();
                barrier.SignalAndWait();
                Assert.Equal(1, released);
                // Two releases give back at most two arrays since the last round, so three rents find every one of them.
                // The array is held by the drain from here on: the next round rents a fresh one.
                Assert.Equal(1, pool.Lent(array, rents: 3));
            }
        }
        finally
        {
            stop.Cancel();
            threads.ForEach(t => t.Join());
        }
    }

    [Fact]
    public void A_payload_over_a_callers_array_keeps_its_values_and_never_puts_that_array_in_the_pool()
    {
        using var pool = new Drained();
        // A size the pool would take without complaint: a bucket's exact length.
        var probe = FloatPayload.Pool.Rent(Length);
        FloatPayload.Pool.Return(probe);
        var array = Values(probe.Length);
        var copy = (float[])array.Clone();
        var payload = new FloatPayload(array);
        int released = 0;
        payload.OnRelease(() => released++);

        payload.Release();
        payload.Release();
        Assert.Equal(copy, array);
        Assert.Equal(copy, payload.Span.ToArray());
        Assert.Equal(0, released);
        Assert.Equal(0, pool.Lent(array));
    }

    [Fact]
    public void A_payload_over_a_callers_memory_keeps_its_values_and_never_puts_that_array_in_the_pool()
    {
        using var pool = new Drained();
        var probe = FloatPayload.Pool.Rent(Length);
        FloatPayload.Pool.Return(probe);
        var array = Values(probe.Length);
        var copy = (float[])array.Clone();
        var whole = new FloatPayload((ReadOnlyMemory<float>)array);
        var part = new FloatPayload(array.AsMemory(3, Length));

        whole.Release();
        part.Release();
        part.Release();
        Assert.Equal(copy, array);
        Assert.Equal(copy, whole.Span.ToArray());
        Assert.Equal(copy.AsSpan(3, Length).ToArray(), part.Span.ToArray());
        Assert.Equal(0, pool.Lent(array));
    }

    [Fact]
    public void A_payload_read_by_the_serializer_is_rented_from_the_pool_with_its_values_and_goes_back_on_release()
    {
        var serializer = Services.GetRequiredService<Serializer>();
        var values = Values(Length);
        var bytes = serializer.SerializeToArray(new ParameterVersion(42, new FloatPayload(values)));
        // The codec's block: the floats' bytes in one piece, not one tagged field per element.
        Assert.InRange(bytes.Length, Length * sizeof(float), Length * sizeof(float) + 64);

        using var pool = new Drained();
        var read = serializer.Deserialize<ParameterVersion>(bytes)!;
        Assert.Equal(42, read.Step);
        Assert.Equal(values, read.Parameters.Span.ToArray());
        var array = ArrayOf(read.Parameters);
        Assert.NotSame(values, array);
        // Rented: a pool-sized array (the payload a view of its start), and not one the drain is holding.
        Assert.True(array.Length > Length, $"an array of {array.Length} floats for {Length}");
        Assert.False(pool.Holds(array));

        read.Parameters.Release();
        read.Parameters.Release();
        Assert.Equal(1, pool.Lent(array));
    }

    [Fact]
    public void One_payload_sent_twice_in_a_message_is_read_as_one_rented_payload()
    {
        var serializer = Services.GetRequiredService<Serializer>();
        var payload = new FloatPayload(Values(Length));
        var bytes = serializer.SerializeToArray(new[] { payload, payload });

        using var pool = new Drained();
        var read = serializer.Deserialize<FloatPayload[]>(bytes)!;
        Assert.Same(read[0], read[1]);
        var array = ArrayOf(read[0]);
        read[0].Release();
        read[1].Release();
        Assert.Equal(1, pool.Lent(array));
    }

    [Fact]
    public void A_copy_inside_a_silo_passes_the_payload_itself()
    {
        var copier = Services.GetRequiredService<DeepCopier>();
        var values = Values(Length);
        var payload = new FloatPayload(values);
        Assert.Same(payload, copier.Copy(payload));
        var message = new ParameterVersion(7, payload);
        var copied = copier.Copy(message);
        Assert.Same(payload, copied.Parameters);
        Assert.Same(values, ArrayOf(copied.Parameters));

        // A rented one too: still the one array, which its single release gives back once.
        using var pool = new Drained();
        var rented = FloatPayload.Rent(Length);
        var array = ArrayOf(rented);
        var copy = copier.Copy(rented);
        Assert.Same(rented, copy);
        copy.Release();
        rented.Release();
        Assert.Equal(1, pool.Lent(array));
    }
}

/// <summary>Tests that count what is in <see cref="FloatPayload.Pool"/>, the process's own: run with no other test alongside.</summary>
[CollectionDefinition(nameof(FloatPayloadPool), DisableParallelization = true)]
public sealed class FloatPayloadPool;
