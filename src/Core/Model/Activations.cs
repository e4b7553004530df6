using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Numerics.Tensors;

namespace Backprop.Core.Model;

/// <summary>Element-wise activations on spans, and their derivatives expressed through the output a = f(z).</summary>
public static class Activations
{
    public static void Apply(Activation f, Span<float> z)
    {
        switch (f)
        {
            case Activation.Sigmoid: TensorPrimitives.Sigmoid(z, z); break;
            case Activation.Tanh: TensorPrimitives.Tanh(z, z); break;
            case Activation.Relu: TensorPrimitives.Max(z, 0f, z); break;
            default: throw new ArgumentOutOfRangeException(nameof(f), f, null);
        }
    }

    /// <summary>
    /// delta[i] *= f'(z[i]), with f' written in terms of a = f(z). Branch-free and vectorised: a ReLU mask
    /// depends on the data, and a branch per element mispredicts about half the time. Vector and scalar
    /// paths apply the same operations, so an element's result does not depend on its position.
    /// </summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    public static void MultiplyByDerivative(Activation f, ReadOnlySpan<float> a, Span<float> delta)
    {
        if (a.Length != delta.Length) throw new ArgumentException("activations and deltas differ in length");
        int i = 0, n = a.Length;
        ref float ar = ref MemoryMarshal.GetReference(a);
        ref float dr = ref MemoryMarshal.GetReference(delta);
        if (Vector512.IsHardwareAccelerated)
        {
            var one = Vector512<float>.One;
            for (; i + 16 <= n; i += 16)
            {
                var av = Vector512.LoadUnsafe(ref ar, (nuint)i);
                var dv = Vector512.LoadUnsafe(ref dr, (nuint)i);
                dv = f switch
                {
                    Activation.Sigmoid => dv * (av * (one - av)),
                    Activation.Tanh => dv * (one - av * av),
                    _ => Vector512.ConditionalSelect(Vector512.GreaterThan(av, Vector512<float>.Zero), dv, Vector512<float>.Zero),
                };
                dv.StoreUnsafe(ref dr, (nuint)i);
            }
        }
        for (; i < n; i++)
        {
            float ai = a[i];
            delta[i] = f switch
            {
                Activation.Sigmoid => delta[i] * (ai * (1f - ai)),
                Activation.Tanh => delta[i] * (1f - ai * ai),
                _ => ai > 0f ? delta[i] : 0f,
            };
        }
    }

    public static double Scalar(Activation f, double z) => f switch
    {
        Activation.Sigmoid => 1.0 / (1.0 + Math.Exp(-z)),
        Activation.Tanh => Math.Tanh(z),
        Activation.Relu => Math.Max(z, 0.0),
        _ => throw new ArgumentOutOfRangeException(nameof(f), f, null),
    };

    public static double ScalarDerivative(Activation f, double z) => f switch
    {
        Activation.Sigmoid => Scalar(f, z) * (1.0 - Scalar(f, z)),
        Activation.Tanh => 1.0 - Math.Tanh(z) * Math.Tanh(z),
        Activation.Relu => z > 0 ? 1.0 : 0.0,
        _ => throw new ArgumentOutOfRangeException(nameof(f), f, null),
    };
}
