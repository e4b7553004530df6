using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace Backprop.Core.Numerics;

/// <summary>
/// C = A·B for the three products of backprop, with register tiles of 4 rows × 4 vectors.
///   A: m × k, element (r, p) at a[r·aRow + p·aCol] — broadcast, so any layout (W, Wᵀ, δᵀ) works without copying
///   B: k × n, row p at b[p·ldb], contiguous
///   C: m × n, row r at c[r·ldc], overwritten
/// Every C element is one FMA chain over p = 0, 1, …, k−1 starting from zero, so its bits do not depend on
/// the tile it falls in, the vector width (Vector512, Vector256 or scalar: FMA rounds once in all three)
/// or how rows are split between threads.
/// The Vector512 and Vector256 tiles are written out twice on purpose: .NET 10 has no public generic
/// vector interface to write them once, and each must stay a straight-line block of registers.
/// </summary>
public static unsafe class Gemm
{
    public enum Isa { Scalar, Vector256, Vector512 }

    public static Isa Best => Vector512.IsHardwareAccelerated ? Isa.Vector512 : Vector256.IsHardwareAccelerated && System.Runtime.Intrinsics.X86.Fma.IsSupported ? Isa.Vector256 : Isa.Scalar;

    /// <summary>
    /// Rows [rowStart, rowEnd) of C, with every extent checked against the spans first: the kernel itself
    /// works on pointers and would write past a short C. Strides are not negative.
    /// </summary>
    public static void Multiply(Isa isa, int rowStart, int rowEnd, int n, int k, ReadOnlySpan<float> a, int aRow, int aCol, ReadOnlySpan<float> b, int ldb, Span<float> c, int ldc)
    {
        if (rowStart < 0 || rowEnd < rowStart || n < 0 || k < 0 || aRow < 0 || aCol < 0 || ldb < 0 || ldc < 0)
            throw new ArgumentOutOfRangeException(nameof(rowStart), $"rows [{rowStart}, {rowEnd}), n {n}, k {k} and strides {aRow}, {aCol}, {ldb}, {ldc} must not be negative");
        if (rowEnd > rowStart && n > 0)
        {
            // The last element each operand is read or written at, in 64 bits (ints that wrap would pass).
            long lastRow = rowEnd - 1;
            if (k > 0) Need(a.Length, lastRow * aRow + (k - 1L) * aCol + 1, nameof(a));
            if (k > 0) Need(b.Length, (k - 1L) * ldb + n, nameof(b));
            Need(c.Length, lastRow * ldc + n, nameof(c));
        }
        fixed (float* pa = a, pb = b, pc = c) Multiply(isa, rowStart, rowEnd, n, k, pa, aRow, aCol, pb, ldb, pc, ldc);

        static void Need(int length, long needed, string name)
        {
            if (length < needed) throw new ArgumentException($"{name} has {length} elements; the product reaches element {needed - 1}", name);
        }
    }

    /// <summary>Rows [rowStart, rowEnd) of C, unchecked: the caller owns the extents (BatchBackprop sizes its buffers for them).</summary>
    internal static void Multiply(Isa isa, int rowStart, int rowEnd, int n, int k, float* a, nint aRow, nint aCol, float* b, nint ldb, float* c, nint ldc)
    {
        int r = rowStart;
        for (; r + 4 <= rowEnd; r += 4)
        {
            float* ar = a + r * aRow, cr = c + r * ldc;
            int j = isa switch
            {
                Isa.Vector512 => Rows4x512(n, k, ar, aRow, aCol, b, ldb, cr, ldc),
                Isa.Vector256 => Rows4x256(n, k, ar, aRow, aCol, b, ldb, cr, ldc),
                _ => 0,
            };
            for (int row = 0; row < 4; row++) ScalarColumns(j, n, k, ar + row * aRow, aCol, b, ldb, cr + row * ldc);
        }
        for (; r < rowEnd; r++)
        {
            float* ar = a + r * aRow, cr = c + r * ldc;
            int j = isa switch
            {
                Isa.Vector512 => Row1x512(n, k, ar, aCol, b, ldb, cr),
                Isa.Vector256 => Row1x256(n, k, ar, aCol, b, ldb, cr),
                _ => 0,
            };
            ScalarColumns(j, n, k, ar, aCol, b, ldb, cr);
        }
    }

    private static void ScalarColumns(int from, int n, int k, float* a, nint aCol, float* b, nint ldb, float* c)
    {
        for (int j = from; j < n; j++)
        {
            float acc = 0;
            for (int p = 0; p < k; p++) acc = MathF.FusedMultiplyAdd(a[p * aCol], b[p * ldb + j], acc);
            c[j] = acc;
        }
    }

    /// <summary>Four rows of C, 64 then 16 columns at a time; returns the first column left for the scalar tail.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int Rows4x512(int n, int k, float* a, nint aRow, nint aCol, float* b, nint ldb, float* c, nint ldc)
    {
        int j = 0;
        for (; j + 64 <= n; j += 64)
        {
            Vector512<float> c00 = default, c01 = default, c02 = default, c03 = default;
            Vector512<float> c10 = default, c11 = default, c12 = default, c13 = default;
            Vector512<float> c20 = default, c21 = default, c22 = default, c23 = default;
            Vector512<float> c30 = default, c31 = default, c32 = default, c33 = default;
            float* ap = a, bp = b + j;
            for (int p = 0; p < k; p++, ap += aCol, bp += ldb)
            {
                var b0 = Vector512.Load(bp); var b1 = Vector512.Load(bp + 16); var b2 = Vector512.Load(bp + 32); var b3 = Vector512.Load(bp + 48);
                var a0 = Vector512.Create(ap[0]);
                c00 = Vector512.FusedMultiplyAdd(a0, b0, c00); c01 = Vector512.FusedMultiplyAdd(a0, b1, c01);
                c02 = Vector512.FusedMultiplyAdd(a0, b2, c02); c03 = Vector512.FusedMultiplyAdd(a0, b3, c03);
                var a1 = Vector512.Create(ap[aRow]);
                c10 = Vector512.FusedMultiplyAdd(a1, b0, c10); c11 = Vector512.FusedMultiplyAdd(a1, b1, c11);
                c12 = Vector512.FusedMultiplyAdd(a1, b2, c12); c13 = Vector512.FusedMultiplyAdd(a1, b3, c13);
                var a2 = Vector512.Create(ap[2 * aRow]);
                c20 = Vector512.FusedMultiplyAdd(a2, b0, c20); c21 = Vector512.FusedMultiplyAdd(a2, b1, c21);
                c22 = Vector512.FusedMultiplyAdd(a2, b2, c22); c23 = Vector512.FusedMultiplyAdd(a2, b3, c23);
                var a3 = Vector512.Create(ap[3 * aRow]);
                c30 = Vector512.FusedMultiplyAdd(a3, b0, c30); c31 = Vector512.FusedMultiplyAdd(a3, b1, c31);
                c32 = Vector512.FusedMultiplyAdd(a3, b2, c32); c33 = Vector512.FusedMultiplyAdd(a3, b3, c33);
            }
            float* c0 = c + j, c1 = c0 + ldc, c2 = c1 + ldc, c3 = c2 + ldc;
            c00.Store(c0); c01.Store(c0 + 16); c02.Store(c0 + 32); c03.Store(c0 + 48);
            c10.Store(c1); c11.Store(c1 + 16); c12.Store(c1 + 32); c13.Store(c1 + 48);
            c20.Store(c2); c21.Store(c2 + 16); c22.Store(c2 + 32); c23.Store(c2 + 48);
            c30.Store(c3); c31.Store(c3 + 16); c32.Store(c3 + 32); c33.Store(c3 + 48);
        }
        for (; j + 16 <= n; j += 16)
        {
            Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default;
            float* ap = a, bp = b + j;
            for (int p = 0; p < k; p++, ap += aCol, bp += ldb)
            {
                var bv = Vector512.Load(bp);
                c0 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[0]), bv, c0);
                c1 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[aRow]), bv, c1);
                c2 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[2 * aRow]), bv, c2);
                c3 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[3 * aRow]), bv, c3);
            }
            c0.Store(c + j); c1.Store(c + ldc + j); c2.Store(c + 2 * ldc + j); c3.Store(c + 3 * ldc + j);
        }
        return j;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int Row1x512(int n, int k, float* a, nint aCol, float* b, nint ldb, float* c)
    {
        int j = 0;
        for (; j + 64 <= n; j += 64)
        {
            Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default;
            float* ap = a, bp = b + j;
            for (int p = 0; p < k; p++, ap += aCol, bp += ldb)
            {
                var av = Vector512.Create(ap[0]);
                c0 = Vector512.FusedMultiplyAdd(av, Vector512.Load(bp), c0);
                c1 = Vector512.FusedMultiplyAdd(av, Vector512.Load(bp + 16), c1);
                c2 = Vector512.FusedMultiplyAdd(av, Vector512.Load(bp + 32), c2);
                c3 = Vector512.FusedMultiplyAdd(av, Vector512.Load(bp + 48), c3);
            }
            c0.Store(c + j); c1.Store(c + j + 16); c2.Store(c + j + 32); c3.Store(c + j + 48);
        }
        for (; j + 16 <= n; j += 16)
        {
            Vector512<float> c0 = default;
            float* ap = a, bp = b + j;
            for (int p = 0; p < k; p++, ap += aCol, bp += ldb) c0 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[0]), Vector512.Load(bp), c0);
            c0.Store(c + j);
        }
        return j;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int Rows4x256(int n, int k, float* a, nint aRow, nint aCol, float* b, nint ldb, float* c, nint ldc)
    {
        int j = 0;
        for (; j + 32 <= n; j += 32)
        {
            Vector256<float> c00 = default, c01 = default, c02 = default, c03 = default;
            Vector256<float> c10 = default, c11 = default, c12 = default, c13 = default;
            Vector256<float> c20 = default, c21 = default, c22 = default, c23 = default;
            Vector256<float> c30 = default, c31 = default, c32 = default, c33 = default;
            float* ap = a, bp = b + j;
            for (int p = 0; p < k; p++, ap += aCol, bp += ldb)
            {
                var b0 = Vector256.Load(bp); var b1 = Vector256.Load(bp + 8); var b2 = Vector256.Load(bp + 16); var b3 = Vector256.Load(bp + 24);
                var a0 = Vector256.Create(ap[0]);
                c00 = Vector256.FusedMultiplyAdd(a0, b0, c00); c01 = Vector256.FusedMultiplyAdd(a0, b1, c01);
                c02 = Vector256.FusedMultiplyAdd(a0, b2, c02); c03 = Vector256.FusedMultiplyAdd(a0, b3, c03);
                var a1 = Vector256.Create(ap[aRow]);
                c10 = Vector256.FusedMultiplyAdd(a1, b0, c10); c11 = Vector256.FusedMultiplyAdd(a1, b1, c11);
                c12 = Vector256.FusedMultiplyAdd(a1, b2, c12); c13 = Vector256.FusedMultiplyAdd(a1, b3, c13);
                var a2 = Vector256.Create(ap[2 * aRow]);
                c20 = Vector256.FusedMultiplyAdd(a2, b0, c20); c21 = Vector256.FusedMultiplyAdd(a2, b1, c21);
                c22 = Vector256.FusedMultiplyAdd(a2, b2, c22); c23 = Vector256.FusedMultiplyAdd(a2, b3, c23);
                var a3 = Vector256.Create(ap[3 * aRow]);
                c30 = Vector256.FusedMultiplyAdd(a3, b0, c30); c31 = Vector256.FusedMultiplyAdd(a3, b1, c31);
                c32 = Vector256.FusedMultiplyAdd(a3, b2, c32); c33 = Vector256.FusedMultiplyAdd(a3, b3, c33);
            }
            float* c0 = c + j, c1 = c0 + ldc, c2 = c1 + ldc, c3 = c2 + ldc;
            c00.Store(c0); c01.Store(c0 + 8); c02.Store(c0 + 16); c03.Store(c0 + 24);
            c10.Store(c1); c11.Store(c1 + 8); c12.Store(c1 + 16); c13.Store(c1 + 24);
            c20.Store(c2); c21.Store(c2 + 8); c22.Store(c2 + 16); c23.Store(c2 + 24);
            c30.Store(c3); c31.Store(c3 + 8); c32.Store(c3 + 16); c33.Store(c3 + 24);
        }
        for (; j + 8 <= n; j += 8)
        {
            Vector256<float> c0 = default, c1 = default, c2 = default, c3 = default;
            float* ap = a, bp = b + j;
            for (int p = 0; p < k; p++, ap += aCol, bp += ldb)
            {
                var bv = Vector256.Load(bp);
                c0 = Vector256.FusedMultiplyAdd(Vector256.Create(ap[0]), bv, c0);
                c1 = Vector256.FusedMultiplyAdd(Vector256.Create(ap[aRow]), bv, c1);
                c2 = Vector256.FusedMultiplyAdd(Vector256.Create(ap[2 * aRow]), bv, c2);
                c3 = Vector256.FusedMultiplyAdd(Vector256.Create(ap[3 * aRow]), bv, c3);
            }
            c0.Store(c + j); c1.Store(c + ldc + j); c2.Store(c + 2 * ldc + j); c3.Store(c + 3 * ldc + j);
        }
        return j;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int Row1x256(int n, int k, float* a, nint aCol, float* b, nint ldb, float* c)
    {
        int j = 0;
        for (; j + 8 <= n; j += 8)
        {
            Vector256<float> c0 = default;
            float* ap = a, bp = b + j;
            for (int p = 0; p < k; p++, ap += aCol, bp += ldb) c0 = Vector256.FusedMultiplyAdd(Vector256.Create(ap[0]), Vector256.Load(bp), c0);
            c0.Store(c + j);
        }
        return j;
    }
}

/// <summary>The operands of one product, so that a row range of it can be computed by any thread.</summary>
internal readonly unsafe struct GemmJob(Gemm.Isa isa, int n, int k, float* a, nint aRow, nint aCol, float* b, nint ldb, float* c, nint ldc)
{
    public void Rows(int from, int to) => Gemm.Multiply(isa, from, to, n, k, a, aRow, aCol, b, ldb, c, ldc);
}
