using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Security.Cryptography;

namespace Backprop.Core;

public static class ParameterHash
{
    /// <summary>SHA-256 (lower-case hex) of the parameters as little-endian float32 bytes.</summary>
    public static string Sha256(ReadOnlySpan<float> parameters)
    {
        if (BitConverter.IsLittleEndian) return Convert.ToHexStringLower(SHA256.HashData(MemoryMarshal.AsBytes(parameters)));
        var bytes = new byte[parameters.Length * 4];
        for (int i = 0; i < parameters.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(4 * i), parameters[i]);
        return Convert.ToHexStringLower(SHA256.HashData(bytes));
    }
}
