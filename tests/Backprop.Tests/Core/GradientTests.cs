using Backprop.Core.Model;
using Backprop.Core.Numerics;

namespace Backprop.Tests.Core;

/// <summary>The fast batched backprop against the per-sample reference and against finite differences.</summary>
public class GradientTests
{
    public static TheoryData<Activation, Loss> AllCombinations()
    {
        var data = new TheoryData<Activation, Loss>();
        foreach (var a in Enum.GetValues<Activation>())
            foreach (var l in Enum.GetValues<Loss>())
                data.Add(a, l);
        return data;
    }

    private static (ModelSpec Spec, float[] Params, List<(float[] X, int Label)> Samples) Problem(Activation a, Loss l, int n = 7)
    {
        var spec = new ModelSpec([12, 9, 7, 5], a, l);
        // PyTorch's small uniform init keeps sigmoid and tanh out of saturation, and its random biases put
        // ReLU units on both sides of zero, so every path of the derivative is exercised.
        var p = Initializer.Create(spec, InitScheme.PyTorch, seed: 42);
        var rng = new Rng(7);
        var samples = Enumerable.Range(0, n)
            .Select(_ => (Enumerable.Range(0, 12).Select(_ => (float)rng.NextDouble()).ToArray(), rng.NextInt(5)))
            .ToList();
        return (spec, p, samples);
    }

    private static (float[] Grad, double Loss) Fast(ModelSpec spec, float[] p, List<(float[] X, int Label)> samples)
    {
        var bp = new BatchBackprop(spec, samples.Count + 3);
        var input = bp.Input(samples.Count);
        for (int i = 0; i < samples.Count; i++) samples[i].X.CopyTo(input.Slice(i * spec.InputSize));
        var labels = samples.Select(s => (byte)s.Label).ToArray();
        var grad = new float[p.Length];
        double loss = bp.GradientSum(p, samples.Count, labels, grad);
        return (grad, loss);
    }

    [Theory]
    [MemberData(nameof(AllCombinations))]
    public void Fast_matches_reference(Activation a, Loss l)
    {
        var (spec, p, samples) = Problem(a, l);
        var (fast, fastLoss) = Fast(spec, p, samples);
        var (reference, refLoss) = ReferenceBackprop.GradientSum(spec, p.Select(v => (double)v).ToArray(), samples);

        Assert.Equal(refLoss, fastLoss, 1e-4 * Math.Max(1, Math.Abs(refLoss)));
        double scale = reference.Max(Math.Abs);
        Assert.True(scale > 1e-3, "the problem must have non-trivial gradients");
        for (int i = 0; i < p.Length; i++)
            Assert.True(Math.Abs(fast[i] - reference[i]) <= 1e-5 + 1e-4 * scale, $"parameter {i}: fast {fast[i]} vs reference {reference[i]}");
    }

    [Theory]
    [MemberData(nameof(AllCombinations))]
    public void Reference_and_fast_match_finite_differences(Activation a, Loss l)
    {
        var (spec, p, samples) = Problem(a, l, n: 4);
        var theta = p.Select(v => (double)v).ToArray();
        var (reference, _) = ReferenceBackprop.GradientSum(spec, theta, samples);
        var (fast, _) = Fast(spec, p, samples);
        const double h = 1e-6;
        int kinks = 0;
        for (int i = 0; i < theta.Length; i++)
        {
            double saved = theta[i];
            theta[i] = saved + h;
            double up = ReferenceBackprop.LossSum(spec, theta, samples);
            theta[i] = saved - h;
            double down = ReferenceBackprop.LossSum(spec, theta, samples);
            theta[i] = saved;
            double numeric = (up - down) / (2 * h);
            if (Math.Abs(numeric - reference[i]) > 1e-6 + 1e-5 * Math.Abs(numeric))
            {
                // ReLU's kink at 0 makes the central difference disagree only when a unit sits within h of it.
                Assert.True(a == Activation.Relu, $"parameter {i}: reference {reference[i]} vs numeric {numeric}");
                kinks++;
                continue;
            }
            Assert.True(Math.Abs(numeric - fast[i]) <= 1e-4 + 1e-3 * Math.Abs(numeric), $"parameter {i}: fast {fast[i]} vs numeric {numeric}");
        }
        Assert.True(kinks <= 2, $"{kinks} parameters disagreed with finite differences");
    }

    [Fact]
    public void Gradient_sum_is_the_sum_of_per_sample_gradients()
    {
        var (spec, p, samples) = Problem(Activation.Tanh, Loss.CrossEntropy, n: 6);
        var (all, lossAll) = Fast(spec, p, samples);
        var (first, loss1) = Fast(spec, p, samples.Take(3).ToList());
        var (second, loss2) = Fast(spec, p, samples.Skip(3).ToList());
        Assert.Equal(lossAll, loss1 + loss2, 1e-9);
        for (int i = 0; i < p.Length; i++) Assert.Equal(all[i], first[i] + second[i], 1e-5);
    }

    [Fact]
    public void Momentum_step_matches_pytorch_formulation()
    {
        var settings = new OptimizerSettings(OptimizerKind.Momentum, 0.1f, 0.9f);
        float[] p = [1f, -2f], v = [0f, 0f];
        Optimizer.For(settings).Step(0, p, new float[] { 4f, 8f }, 2, v);   // g = [2, 4]; v = g; p -= 0.1 v
        Assert.Equal([0.8f, -2.4f], p);
        Optimizer.For(settings).Step(0, p, new float[] { 2f, 0f }, 2, v);   // g = [1, 0]; v = 0.9 v + g = [2.8, 3.6]
        Assert.Equal(2.8f, v[0], 1e-6f);
        Assert.Equal(3.6f, v[1], 1e-6f);
        Assert.Equal(0.8f - 0.28f, p[0], 1e-6f);
        Assert.Equal(-2.4f - 0.36f, p[1], 1e-6f);
    }

    [Theory]
    [InlineData(OptimizerKind.Sgd)]
    [InlineData(OptimizerKind.Momentum)]
    public void Optimizer_step_gives_every_element_the_same_bits_as_the_scalar_formula(OptimizerKind kind)
    {
        // 91 elements: the vector body and the scalar tail both run.
        var settings = new OptimizerSettings(kind, 0.03f, 0.9f);
        var rng = new Rng(9);
        float[] p = Enumerable.Range(0, 91).Select(_ => (float)rng.NextGaussian()).ToArray();
        float[] v = Enumerable.Range(0, 91).Select(_ => (float)rng.NextGaussian()).ToArray();
        float[] g = Enumerable.Range(0, 91).Select(_ => (float)rng.NextGaussian() * 7f).ToArray();
        float[] expectedP = (float[])p.Clone(), expectedV = (float[])v.Clone();
        for (int i = 0; i < p.Length; i++)
        {
            float step = kind == OptimizerKind.Sgd ? g[i] / 3f : expectedV[i] = 0.9f * expectedV[i] + g[i] / 3f;
            expectedP[i] = expectedP[i] - 0.03f * step;
        }
        Optimizer.For(settings).Step(0, p, g, 3, v);
        Assert.Equal(expectedP.Select(BitConverter.SingleToInt32Bits), p.Select(BitConverter.SingleToInt32Bits));
        Assert.Equal(expectedV.Select(BitConverter.SingleToInt32Bits), v.Select(BitConverter.SingleToInt32Bits));
    }
}
