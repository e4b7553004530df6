namespace Backprop.TorchPeer;

/// <summary>
/// TorchSharp 0.107's libLibTorchSharp.so was linked with GCC 13 and so asks libstdc++ for version GLIBCXX_3.4.32,
/// which Debian 12's libstdc++ (GCC 12, up to 3.4.30) lacks: the load fails. The only symbol of that version is
/// std::ios_base_library_init(), which GCC 13's &lt;iostream&gt; names as an anchor and nothing calls or relocates
/// (readelf -r shows no use of it). Marking that one version need weak (VER_FLG_WEAK, as the ELF gABI allows)
/// lets the dynamic loader accept its absence; where libstdc++ has it, nothing changes. The bytes patched are
/// the copy in this program's output folder, never the NuGet cache.
/// </summary>
internal static class LibStdCxxCompat
{
    private const uint ShtGnuVerneed = 0x6ffffffe;
    private const ushort VerFlgWeak = 0x2;
    private const string Version = "GLIBCXX_3.4.32";

    /// <summary>The native library beside this program, patched where it needs it; false where there is nothing to patch.</summary>
    public static bool Apply()
    {
        if (!OperatingSystem.IsLinux()) return false;
        string path = Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        if (!File.Exists(path)) return false;
        byte[] elf = File.ReadAllBytes(path);
        long flagsAt = FindFlags(elf, path);
        if (flagsAt < 0 || (BitConverter.ToUInt16(elf, (int)flagsAt) & VerFlgWeak) != 0) return false;
        BitConverter.TryWriteBytes(elf.AsSpan((int)flagsAt), (ushort)(BitConverter.ToUInt16(elf, (int)flagsAt) | VerFlgWeak));
        File.WriteAllBytes(path, elf);
        return true;
    }

    /// <summary>The file offset of the vna_flags of <see cref="Version"/>'s Elf64_Vernaux entry, or -1 where it has none.</summary>
    private static long FindFlags(byte[] elf, string path)
    {
        if (elf.Length < 64 || elf[0] != 0x7f || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F' || elf[4] != 2 || elf[5] != 1)
            throw new InvalidDataException($"{path}: not a little-endian 64-bit ELF file");
        long shoff = BitConverter.ToInt64(elf, 0x28);
        int shentsize = BitConverter.ToUInt16(elf, 0x3a), shnum = BitConverter.ToUInt16(elf, 0x3c);
        for (int s = 0; s < shnum; s++)
        {
            int sh = checked((int)(shoff + (long)s * shentsize));
            if (BitConverter.ToUInt32(elf, sh + 4) != ShtGnuVerneed) continue;
            long table = BitConverter.ToInt64(elf, sh + 0x18);
            int link = BitConverter.ToInt32(elf, sh + 0x28);
            long strtab = BitConverter.ToInt64(elf, checked((int)(shoff + (long)link * shentsize)) + 0x18);
            // Elf64_Verneed: vn_version, vn_cnt (u16), vn_file, vn_aux, vn_next (u32); Elf64_Vernaux: vna_hash (u32),
            // vna_flags, vna_other (u16), vna_name, vna_next (u32).
            for (long need = table; ; )
            {
                int count = BitConverter.ToUInt16(elf, (int)need + 2);
                long aux = need + BitConverter.ToUInt32(elf, (int)need + 8);
                for (int a = 0; a < count; a++)
                {
                    if (NameAt(elf, strtab + BitConverter.ToUInt32(elf, (int)aux + 8)) == Version) return aux + 4;
                    aux += BitConverter.ToUInt32(elf, (int)aux + 12);
                }
                uint next = BitConverter.ToUInt32(elf, (int)need + 12);
                if (next == 0) return -1;
                need += next;
            }
        }
        return -1;
    }

    private static string NameAt(byte[] elf, long at)
    {
        int end = Array.IndexOf(elf, (byte)0, (int)at);
        return System.Text.Encoding.ASCII.GetString(elf, (int)at, end - (int)at);
    }
}
