using System.Numerics;

namespace Backprop.Core.Numerics;

/// <summary>
/// Adam, and AdamW with <paramref name="decoupled"/> (as PyTorch now writes AdamW: Adam with decoupled weight decay),
/// in the order of operations of torch.optim.Adam's single-tensor path (the CPU default), t = step + 1:
/// <code>
/// g = gradientSum / count
/// AdamW: θ ← θ · (1 − lr·wd)          Adam: g ← g + wd·θ      (when wd ≠ 0)
/// m ← m + (1 − β1)·(g − m)             (lerp_, its scalar form: PyTorch's vector form fuses it)
/// v ← v·β2 + ((1 − β2)·g)·g            (mul_, addcmul_)
/// denom = √v / √(1 − β2^t) + eps
/// θ ← θ + (−lr / (1 − β1^t))·m / denom  (addcdiv_)
/// </code>
/// The scalars (1 − β1, lr / (1 − β1^t), ...) are computed in double as Python does, then rounded to float as
/// PyTorch's kernels take them. State: m, then v.
/// </summary>
public sealed class Adam(LearningRateSchedule schedule, double beta1, double beta2, double eps, double weightDecay, bool decoupled) : Optimizer
{
    public override int StateVectors => 2;

    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    public override void Step(long step, ReadOnlySpan<float> parameters, ReadOnlySpan<float> gradientSum, int count, StateTile state,
        Span<float> parametersOut, StateTile stateOut)
    {
        CheckLengths(parameters, gradientSum, parametersOut);
        Span<float> m = state[0], v = state[1], mOut = stateOut[0], vOut = stateOut[1];
        if (m.Length != parameters.Length || mOut.Length != parameters.Length || v.Length != parameters.Length || vOut.Length != parameters.Length)
            throw new ArgumentException("optimizer state and parameters differ in length");
        double lr = schedule.At(step), t = step + 1;
        float n = count;
        float shrink = (float)(1 - lr * weightDecay), wd = (float)weightDecay;
        bool decoupledDecay = decoupled && weightDecay != 0, coupledDecay = !decoupled && weightDecay != 0;
        float w1 = (float)(1 - beta1), b2 = (float)beta2, w2 = (float)(1 - beta2);
        float negativeStepSize = (float)-(lr / (1 - Math.Pow(beta1, t)));
        float correction2Sqrt = (float)Math.Sqrt(1 - Math.Pow(beta2, t)), e = (float)eps;

        int i = 0, w = Vector<float>.Count;
        Vector<float> vn = new(n), vshrink = new(shrink), vwd = new(wd), vw1 = new(w1), vb2 = new(b2), vw2 = new(w2),
            vstep = new(negativeStepSize), vc2 = new(correction2Sqrt), ve = new(e);
        for (; i + w <= parameters.Length; i += w)
        {
            var p = new Vector<float>(parameters.Slice(i));
            var g = new Vector<float>(gradientSum.Slice(i)) / vn;
            if (decoupledDecay) p *= vshrink;
            if (coupledDecay) g += vwd * p;
            var m0 = new Vector<float>(m.Slice(i));
            var m1 = m0 + vw1 * (g - m0);
            var v1 = new Vector<float>(v.Slice(i)) * vb2 + vw2 * g * g;
            var denom = Vector.SquareRoot(v1) / vc2 + ve;
            m1.CopyTo(mOut.Slice(i));
            v1.CopyTo(vOut.Slice(i));
            (p + vstep * m1 / denom).CopyTo(parametersOut.Slice(i));
        }
        for (; i < parameters.Length; i++)
        {
            float p = parameters[i], g = gradientSum[i] / n;
            if (decoupledDecay) p *= shrink;
            if (coupledDecay) g += wd * p;
            float m1 = m[i] + w1 * (g - m[i]);
            float v1 = v[i] * b2 + w2 * g * g;
            float denom = MathF.Sqrt(v1) / correction2Sqrt + e;
            mOut[i] = m1;
            vOut[i] = v1;
            parametersOut[i] = p + negativeStepSize * m1 / denom;
        }
    }
}
