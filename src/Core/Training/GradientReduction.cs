using System.Numerics.Tensors;
using Backprop.Core.Numerics;

namespace Backprop.Core.Training;

/// <summary>
/// The one way gradient sums are combined: a fixed pairwise tree over chunk numbers. Level 0 holds the chunk
/// sums s_0 … s_{K−1}; node i of level j+1 is node 2i + node 2i+1 of level j (left + right), or node 2i alone
/// when 2i+1 is past the end. The root is the step's gradient sum. Float addition is not associative, so this
/// fixed shape is what makes the result independent of the number of workers.
///
/// Node i of level k covers chunks [i·2ᵏ, min((i+1)·2ᵏ, K)), and is itself the tree over those chunks: a worker
/// holding such an aligned block (<see cref="ChunkBlocks"/>) reduces it alone and sends one sum, and the server
/// reduces the blocks' sums with the same tree one level up. Every split gives the same bits.
///
/// Leaves arrive in order, whole or block by block from the backprop threads (disjoint ranges, in parallel).
/// A finished left subtree waits in a buffer of its level; leaf x merges with the waiting subtrees at the
/// levels where its index has a 1 bit (all of them for the last leaf, the trailing ones otherwise). The root
/// goes to a callback block by block, or stays in a buffer (<see cref="Result"/>). Allocates nothing per sum.
/// </summary>
public sealed class PairwiseSum
{
    private readonly float[][] _owned;
    private readonly ReadOnlyMemory<float>[] _waiting;
    private readonly GradientBlock _leafBlock;
    private int _leaves, _leaf, _target;
    private bool _last;
    private GradientBlock? _root;
    private ReadOnlyMemory<float> _result;

    /// <param name="length">Entries of every sum.</param>
    /// <param name="maxLeaves">The most leaves one sum will have.</param>
    public PairwiseSum(int length, int maxLeaves)
    {
        if (length < 1) throw new ArgumentOutOfRangeException(nameof(length), $"length {length} is not positive");
        if (maxLeaves < 1) throw new ArgumentOutOfRangeException(nameof(maxLeaves), $"{maxLeaves} leaves");
        Length = length;
        MaxLeaves = maxLeaves;
        // One buffer per level a subtree can wait at, and at least one for a root kept in memory.
        int levels = Math.Max(1, Levels(maxLeaves));
        _owned = Enumerable.Range(0, levels).Select(_ => new float[length]).ToArray();
        _waiting = new ReadOnlyMemory<float>[levels];
        _leafBlock = LeafBlock;
    }

    public int Length { get; }
    public int MaxLeaves { get; }

    /// <summary>
    /// Starts a sum of <paramref name="leaves"/> leaves. <paramref name="root"/> receives the root block by block
    /// (it may be called from several threads at once, for disjoint ranges); without it the root stays in this
    /// object's buffer until the next <see cref="Begin"/>.
    /// </summary>
    public void Begin(int leaves, GradientBlock? root = null)
    {
        if (leaves < 1 || leaves > MaxLeaves) throw new ArgumentOutOfRangeException(nameof(leaves), $"{leaves} leaves is outside 1..{MaxLeaves}");
        (_leaves, _leaf, _root, _result) = (leaves, 0, root, default);
        Array.Clear(_waiting);
    }

    /// <summary>True once every leaf has been given.</summary>
    public bool Done => _leaves > 0 && _leaf == _leaves;

    /// <summary>The root, when <see cref="Begin"/> had no callback for it; valid until the next <see cref="Begin"/>.</summary>
    public ReadOnlyMemory<float> Result => Done && _root is null ? _result : throw new InvalidOperationException("the sum is not finished, or went to a callback");

    /// <summary>
    /// Where the next leaf's values go. <see cref="LeafTarget.Buffer"/> set: write the whole leaf there, then call
    /// <see cref="Next"/>. Otherwise give its blocks to <see cref="LeafTarget.Blocks"/> and then call <see cref="Next"/>.
    /// </summary>
    public LeafTarget NextLeaf()
    {
        if (_leaf >= _leaves) throw new InvalidOperationException($"all {_leaves} leaves were given");
        PlanLeaf();
        // A leaf that merges with nothing and waits (or is the root kept here) is written straight into its buffer.
        bool merges = _last ? _leaf != 0 : (_leaf & 1) == 1;
        return merges || (_last && _root is not null) ? new LeafTarget(null, _leafBlock) : new LeafTarget(_owned[_target], null);
    }

    /// <summary>Marks the leaf announced by <see cref="NextLeaf"/> as given.</summary>
    public void Next()
    {
        if (!_last && (_leaf & 1) == 0) _waiting[0] = _owned[0];
        else if (!_last) _waiting[_target] = _owned[_target];
        else if (_root is null) _result = _leaf == 0 ? _owned[0] : _owned[_target];
        if (!_last) ClearMerged();
        _leaf++;
    }

    /// <summary>
    /// Gives the next leaf whole. A leaf that only waits is kept by reference, not copied: <paramref name="values"/>
    /// must stay unchanged until the sum is done.
    /// </summary>
    public void Add(ReadOnlyMemory<float> values)
    {
        if (values.Length != Length) throw new ArgumentException($"a leaf of {values.Length} entries, not {Length}", nameof(values));
        if (_leaf >= _leaves) throw new InvalidOperationException($"all {_leaves} leaves were given");
        PlanLeaf();
        bool merges = _last ? _leaf != 0 : (_leaf & 1) == 1;
        if (!merges && !_last)
        {
            _waiting[0] = values;
            _leaf++;
            return;
        }
        if (!merges && _root is null)
        {
            _result = values;
            _leaf++;
            return;
        }
        LeafBlock(0, values.Span);
        Next();
    }

    /// <summary>
    /// The tree over every leaf's entries [<paramref name="start"/>, start + dest.Length), into
    /// <paramref name="dest"/>, when all leaves are at hand: one pass over them, a range (a tile that stays in L1)
    /// at a time. The root of n leaves is the tree over the first h + the tree over the rest, h the largest power of
    /// two under n (the level-by-level definition, read from the top). <paramref name="scratch"/>: dest.Length
    /// floats per level, <see cref="ScratchFor"/>.
    /// </summary>
    public static void SumRange(ReadOnlySpan<ReadOnlyMemory<float>> leaves, int start, Span<float> dest, Span<float> scratch)
    {
        int n = dest.Length;
        if (leaves.Length == 1)
        {
            leaves[0].Span.Slice(start, n).CopyTo(dest);
            return;
        }
        int h = 1 << (31 - System.Numerics.BitOperations.LeadingZeroCount((uint)(leaves.Length - 1)));
        SumRange(leaves[..h], start, dest, scratch);
        if (leaves.Length - h == 1)
        {
            TensorPrimitives.Add(dest, leaves[h].Span.Slice(start, n), dest);
            return;
        }
        var right = scratch[..n];
        SumRange(leaves[h..], start, right, scratch[n..]);
        TensorPrimitives.Add(dest, right, dest);
    }

    /// <summary>Scratch floats <see cref="SumRange"/> needs for ranges of <paramref name="length"/> over up to <paramref name="maxLeaves"/> leaves.</summary>
    public static int ScratchFor(int length, int maxLeaves) => checked(length * Math.Max(1, Levels(maxLeaves)));

    /// <summary>Decides the leaf's destination: the level it waits at, or (last leaf) the buffer the root is built in.</summary>
    private void PlanLeaf()
    {
        _last = _leaf == _leaves - 1;
        _target = _last ? LowestSetBit(_leaf) : TrailingOnes(_leaf);
    }

    /// <summary>Blocks of the current leaf: merged with the waiting subtrees, in level order (left + right).</summary>
    private void LeafBlock(int start, ReadOnlySpan<float> values)
    {
        int x = _leaf, n = values.Length;
        int top = _last ? Levels(x + 1) : TrailingOnes(x);
        Span<float> node = _last && x == 0 ? default : _owned[_target].AsSpan(start, n);
        ReadOnlySpan<float> right = values;
        for (int level = 0; level < top; level++)
        {
            if ((x >> level & 1) == 0) continue;   // a left child whose right sibling is past the end: passes up unchanged
            TensorPrimitives.Add(_waiting[level].Span.Slice(start, n), right, node);
            right = node;
        }
        if (_last && _root is not null) _root(start, right);
        else if (right != node) right.CopyTo(node);
    }

    private void ClearMerged()
    {
        for (int level = 0; level < TrailingOnes(_leaf); level++) _waiting[level] = default;
    }

    /// <summary>Levels below the root of a tree of n leaves: the bit length of n − 1.</summary>
    private static int Levels(int n) => n <= 1 ? 0 : 32 - System.Numerics.BitOperations.LeadingZeroCount((uint)(n - 1));

    private static int TrailingOnes(int x) => System.Numerics.BitOperations.TrailingZeroCount(~x);

    private static int LowestSetBit(int x) => x == 0 ? 0 : System.Numerics.BitOperations.TrailingZeroCount(x);

    /// <summary>Where a leaf goes: a buffer to write it into, or a callback for its blocks.</summary>
    public readonly record struct LeafTarget(float[]? Buffer, GradientBlock? Blocks);
}

/// <summary>
/// How a step's K chunks are cut into aligned blocks of the reduction tree, one block per busy worker: the
/// smallest power of two 2ᵏ such that ⌈K / 2ᵏ⌉ blocks are no more than the workers. Block b covers chunks
/// [b·2ᵏ, min((b+1)·2ᵏ, K)); its sum is node b of level k of <see cref="PairwiseSum"/>'s tree.
/// </summary>
public readonly record struct ChunkBlocks(int Chunks, int BlockSize)
{
    public static ChunkBlocks For(int chunks, int workers)
    {
        if (chunks < 1) throw new ArgumentOutOfRangeException(nameof(chunks), $"{chunks} chunks");
        if (workers < 1) throw new ArgumentOutOfRangeException(nameof(workers), $"{workers} workers");
        int size = 1;
        while ((chunks + size - 1) / size > workers) size *= 2;
        return new ChunkBlocks(chunks, size);
    }

    public int Count => (Chunks + BlockSize - 1) / BlockSize;
    public int First(int block) => block * BlockSize;
    public int End(int block) => Math.Min(Chunks, (block + 1) * BlockSize);
    public bool IsBlock(int first, int end) => first >= 0 && first % BlockSize == 0 && end == End(first / BlockSize) && first < Chunks;
}
