using System.Globalization;

namespace Backprop.Core;

/// <summary>
/// The largest sizes the product accepts. A run spec arrives in grain messages, so every size derived
/// from it is computed in checked 64-bit arithmetic and compared with these before anything is
/// allocated: an int product that wraps lets the unsafe kernels write past a buffer, and an allocation
/// that cannot succeed takes the silo down. Violations are <see cref="ArgumentException"/>s.
/// </summary>
public static class ResourceLimits
{
    /// <summary>
    /// One Orleans message. Orleans' MaxMessageBodySize is 100 MiB, and a bigger message tears down the
    /// connection between silos instead of failing the call; 64 MiB leaves room for headers and the other fields.
    /// </summary>
    public const long MaxMessageBytes = 64L << 20;

    /// <summary>The parameter vector, and each gradient sum (same shape), travels whole in one message.</summary>
    public const long MaxParameters = MaxMessageBytes / sizeof(float);

    /// <summary>Weight layers: the seed's deepest network has 3; each layer is a row of the plan and of every spec message.</summary>
    public const int MaxWeightLayers = 16;

    /// <summary>Units in one layer: with <see cref="MaxChunkSize"/>, a row offset (units × padded samples) stays below 2^32 before any byte cap applies.</summary>
    public const int MaxLayerWidth = 1 << 16;

    /// <summary>Samples in one step: more than any supported data set holds (EMNIST's largest training set has 697,932).</summary>
    public const int MaxBatchSize = 1_000_000;

    /// <summary>
    /// Samples in one chunk, one batched pass of one worker: a pass of more samples is no faster per sample,
    /// and per-sample arrays (labels, indices, losses) stay small.
    /// </summary>
    public const int MaxChunkSize = 1 << 16;

    /// <summary>
    /// Backprop buffers of one worker thread (its copy of the inputs, activations and deltas of a chunk):
    /// 1 GiB keeps every element offset into a buffer within int range, which the kernels' pointer arithmetic assumes.
    /// </summary>
    public const long MaxThreadBufferBytes = 1L << 30;

    /// <summary>All backprop buffers of one worker (threads × per-thread, plus the shared ones): a silo hosts several workers.</summary>
    public const long MaxWorkerBufferBytes = 4L << 30;

    /// <summary>Threads of one worker: each is a dedicated OS thread that spins between products.</summary>
    public const int MaxThreadsPerWorker = 256;

    /// <summary>Workers × threads per worker: every one of them is an OS thread somewhere in the cluster.</summary>
    public const int MaxTotalThreads = 4096;

    /// <summary>Throws when <paramref name="bytes"/> would not fit one message; <paramref name="what"/> names what is sent.</summary>
    public static void CheckMessageBytes(long bytes, string what)
    {
        if (bytes < 0 || bytes > MaxMessageBytes)
            throw new ArgumentException($"{what}: {Bytes(bytes)} in one message, over the {Bytes(MaxMessageBytes)} limit");
    }

    /// <summary>A byte count as people read it: "8 GiB", "199.1 MiB".</summary>
    public static string Bytes(long bytes)
    {
        string[] units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        double value = bytes;
        int unit = 0;
        while (Math.Abs(value) >= 1024 && unit < units.Length - 1) { value /= 1024; unit++; }
        return unit == 0 ? $"{bytes} bytes" : $"{value.ToString("0.#", CultureInfo.InvariantCulture)} {units[unit]}";
    }
}
