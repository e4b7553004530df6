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
/// holding such a block (<see cref="ChunkBlocks"/>) reduces it alone and sends one sum, and the server combines
/// the blocks' sums with the tree above them (<see cref="SumNodes"/>). Every cut gives the same bits.
///
/// Leaves arrive in order, block by block from the backprop threads (disjoint ranges, in parallel).
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
    private RangeWritten? _written;
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

    /// <summary>Entries [start, start + length) of a root kept in memory are final (see <see cref="Begin"/>).</summary>
    public delegate void RangeWritten(int start, int length);

    /// <summary>
    /// Starts a sum of <paramref name="leaves"/> leaves. <paramref name="root"/> receives the root block by block
    /// (it may be called from several threads at once, for disjoint ranges); without it the root stays in this
    /// object's buffer (<see cref="RootBuffer"/>) until the next <see cref="Begin"/>, and <paramref name="written"/>,
    /// when given, is told each range of it once final, from the thread that wrote it (the last leaf then comes in
    /// blocks, one leaf alone too).
    /// </summary>
    public void Begin(int leaves, GradientBlock? root = null, RangeWritten? written = null)
    {
        if (leaves < 1 || leaves > MaxLeaves) throw new ArgumentOutOfRangeException(nameof(leaves), $"{leaves} leaves is outside 1..{MaxLeaves}");
        if (root is not null && written is not null) throw new ArgumentException("a root given to a callback is not written here");
        (_leaves, _leaf, _root, _written, _result) = (leaves, 0, root, written, default);
        Array.Clear(_waiting);
    }

    /// <summary>Where the root of the sum begun is built when it is kept in memory: final range by range, whole at the end.</summary>
    public ReadOnlyMemory<float> RootBuffer => _owned[LowestSetBit(_leaves - 1)];

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
        return merges || (_last && (_root is not null || _written is not null)) ? new LeafTarget(null, _leafBlock) : new LeafTarget(_owned[_target], null);
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
    /// The tree's root over entries [<paramref name="start"/>, start + dest.Length) of <paramref name="nodes"/>, into
    /// <paramref name="dest"/>: nodes of the tree over <paramref name="chunks"/> chunks, in chunk order, covering them
    /// all, node i starting at chunk <paramref name="starts"/>[i] (a <see cref="ChunkBlocks"/> cut). One pass over
    /// them, a range (a tile that stays in L1) at a time. <paramref name="scratch"/>: <see cref="ScratchFor"/>.
    /// </summary>
    public static void SumNodes(ReadOnlySpan<ReadOnlyMemory<float>> nodes, ReadOnlySpan<int> starts, int chunks, int start, Span<float> dest, Span<float> scratch) =>
        Combine(nodes, starts, 0, chunks, start, dest, scratch);

    /// <summary>
    /// The node over chunks [lo, hi) from the nodes that cover it: itself, or its left child (the first
    /// <see cref="LeftSize"/> chunks) + its right child.
    /// </summary>
    private static void Combine(ReadOnlySpan<ReadOnlyMemory<float>> nodes, ReadOnlySpan<int> starts, int lo, int hi, int start, Span<float> dest, Span<float> scratch)
    {
        int n = dest.Length;
        if (nodes.Length == 1)
        {
            nodes[0].Span.Slice(start, n).CopyTo(dest);
            return;
        }
        int mid = lo + LeftSize(hi - lo), split = starts.IndexOf(mid);
        if (split <= 0) throw new ArgumentException($"the nodes do not cover chunks [{lo}, {hi}) as the tree cuts them");
        Combine(nodes[..split], starts[..split], lo, mid, start, dest, scratch);
        if (nodes.Length - split == 1)
        {
            TensorPrimitives.Add(dest, nodes[split].Span.Slice(start, n), dest);
            return;
        }
        var right = scratch[..n];
        Combine(nodes[split..], starts[split..], mid, hi, start, right, scratch[n..]);
        TensorPrimitives.Add(dest, right, dest);
    }

    /// <summary>Chunks under a node's left child, for a node over n ≥ 2 chunks: the largest power of two below n.</summary>
    public static int LeftSize(int n) => n < 2 ? throw new ArgumentOutOfRangeException(nameof(n), $"a node of {n} chunks has no children")
        : 1 << (31 - System.Numerics.BitOperations.LeadingZeroCount((uint)(n - 1)));

    /// <summary>Whether chunks [first, end) are a node of the tree over <paramref name="chunks"/> chunks.</summary>
    public static bool IsNode(int first, int end, int chunks)
    {
        if (first < 0 || end > chunks || first >= end) return false;
        int size = (int)System.Numerics.BitOperations.RoundUpToPowerOf2((uint)(end - first));
        return first % size == 0 && (end - first == size || end == chunks);
    }

    /// <summary>Scratch floats <see cref="SumNodes"/> needs for ranges of <paramref name="length"/> over up to <paramref name="maxChunks"/> chunks.</summary>
    public static int ScratchFor(int length, int maxChunks) => checked(length * Math.Max(1, Levels(maxChunks)));

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
        Span<float> node = _last && x == 0 && _root is not null ? default : _owned[_target].AsSpan(start, n);
        ReadOnlySpan<float> right = values;
        for (int level = 0; level < top; level++)
        {
            if ((x >> level & 1) == 0) continue;   // a left child whose right sibling is past the end: passes up unchanged
            TensorPrimitives.Add(_waiting[level].Span.Slice(start, n), right, node);
            right = node;
        }
        if (_last && _root is not null) _root(start, right);
        else if (right != node) right.CopyTo(node);
        if (_last) _written?.Invoke(start, n);
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
/// How a step's K chunks are cut into blocks, one per busy worker: nodes of the reduction tree, in chunk order,
/// that together cover all K chunks. Starting from the root, the largest node (the first of the largest) is
/// split into its two children while there are fewer blocks than workers, so up to min(W, K) workers get a block
/// each and the largest block is as small as the tree allows (4 chunks on 3 workers: [0,1) [1,2) [2,4)). Each
/// block's sum is that node of <see cref="PairwiseSum"/>'s tree; the server combines them with the tree above
/// (<see cref="PairwiseSum.SumNodes"/>).
/// </summary>
public sealed class ChunkBlocks
{
    private readonly int[] _starts;

    private ChunkBlocks(int chunks, int[] starts) => (Chunks, _starts) = (chunks, starts);

    public static ChunkBlocks For(int chunks, int workers)
    {
        if (chunks < 1) throw new ArgumentOutOfRangeException(nameof(chunks), $"{chunks} chunks");
        if (workers < 1) throw new ArgumentOutOfRangeException(nameof(workers), $"{workers} workers");
        var nodes = new List<(int First, int End)> { (0, chunks) };
        while (nodes.Count < workers)
        {
            int largest = 0;
            for (int i = 1; i < nodes.Count; i++)
                if (nodes[i].End - nodes[i].First > nodes[largest].End - nodes[largest].First) largest = i;
            var (first, end) = nodes[largest];
            if (end - first == 1) break;
            int mid = first + PairwiseSum.LeftSize(end - first);
            nodes[largest] = (first, mid);
            nodes.Insert(largest + 1, (mid, end));
        }
        return new ChunkBlocks(chunks, nodes.Select(n => n.First).ToArray());
    }

    public int Chunks { get; }
    public int Count => _starts.Length;
    public int First(int block) => _starts[block];
    public int End(int block) => block + 1 < _starts.Length ? _starts[block + 1] : Chunks;
    /// <summary>The first chunk of every block, in order: what the server needs to combine their sums.</summary>
    public ReadOnlySpan<int> Starts => _starts;
}
