using System.Buffers.Binary;
using System.Security.Cryptography;

namespace Backprop.Grains;

/// <summary>Numbers a caller must present and cannot guess: coordinator keys and attach sessions.</summary>
internal static class Secrets
{
    /// <summary>A positive 63-bit number from the operating system's cryptographic generator.</summary>
    public static long NewLong()
    {
        Span<byte> bytes = stackalloc byte[8];
        while (true)
        {
            RandomNumberGenerator.Fill(bytes);
            long value = BinaryPrimitives.ReadInt64LittleEndian(bytes) & long.MaxValue;
            if (value != 0) return value;
        }
    }
}
