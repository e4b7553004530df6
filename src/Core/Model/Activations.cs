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

    /// <summary>delta[i] *= f'(z[i]), with f' written in terms of a = f(z).</summary>
    public static void MultiplyByDerivative(Activation f, ReadOnlySpan<float> a, Span<float> delta)
    {
        switch (f)
        {
            case Activation.Sigmoid:
                for (int i = 0; i < a.Length; i++) delta[i] *= a[i] * (1f - a[i]);
                break;
            case Activation.Tanh:
                for (int i = 0; i < a.Length; i++) delta[i] *= 1f - a[i] * a[i];
                break;
            case Activation.Relu:
                for (int i = 0; i < a.Length; i++) if (a[i] <= 0f) delta[i] = 0f;
                break;
            default: throw new ArgumentOutOfRangeException(nameof(f), f, null);
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
