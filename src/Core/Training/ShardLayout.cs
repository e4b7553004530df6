namespace Backprop.Core.Training;

/// <summary>
/// How the flat parameter vector of <see cref="Parameters"/> entries is cut into <see cref="Shards"/> contiguous
/// slices, one per parameter-server shard: shard j holds [Start(j), End(j)). Cuts fall on multiples of
/// <paramref name="Align"/> floats: 16 (a 64-byte cache line, so no two shards write the same line), or a norm tile
/// (<see cref="GradientClip.Tile"/>) when the run clips its gradient. The optimizer is element-wise and the norm is
/// added up by tiles, so the cut never changes a bit of the result.
/// </summary>
public readonly record struct ShardLayout(int Parameters, int Shards, int Align = ShardLayout.CacheLine)
{
    public const int MaxShards = 256;
    public const int CacheLine = 16;

    public int Start(int shard) => shard <= 0 ? 0 : (int)Math.Min(Parameters, ((long)Parameters * shard / Shards + Align - 1) / Align * Align);
    public int End(int shard) => shard >= Shards - 1 ? Parameters : Start(shard + 1);
    public int Length(int shard) => End(shard) - Start(shard);

    /// <summary>Throws <see cref="ArgumentException"/> unless every shard gets at least one entry.</summary>
    public void Validate()
    {
        if (Align < 1) throw new ArgumentException($"server-shards: alignment {Align} is not positive");
        if (Shards < 1 || Shards > MaxShards) throw new ArgumentException($"server-shards: {Shards} is outside 1..{MaxShards}");
        for (int j = 0; j < Shards; j++)
            if (Length(j) < 1)
                throw new ArgumentException($"server-shards: {Shards} shards of {Parameters} parameters leave shard {j} empty (slices are cut on multiples of {Align}{(Align == GradientClip.Tile ? " floats, the norm tiles of --clip-norm" : "")})");
    }
}
