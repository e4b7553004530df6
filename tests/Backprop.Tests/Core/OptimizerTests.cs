using Backprop.Core.Data;
using Backprop.Core.Numerics;
using Backprop.Core.Training;

namespace Backprop.Tests.Core;

/// <summary>The optimizers against values by hand and against a plain per-element reference of PyTorch's formulas; the schedules by hand.</summary>
public sealed class OptimizerTests
{
    private static OptimizerSettings Settings(OptimizerKind kind, float lr, double weightDecay = 0, float momentum = 0.9f) =>
        new(kind, lr, momentum, weightDecay);

    [Fact]
    public void Adam_moves_each_parameter_by_about_lr_per_step_under_a_constant_gradient()
    {
        // m̂ = g and v̂ = g² for a constant g, so each step is lr·g/(|g| + eps): 1e-3 a step, eps aside.
        float[] p = [1f, -2f], state = new float[4];
        var adam = Optimizer.For(Settings(OptimizerKind.Adam, 1e-3f));
        for (int t = 0; t < 3; t++)
        {
            adam.Step(t, p, new float[] { 0.5f, -8f }, 1, state);
            Assert.Equal(1f - (t + 1) * 1e-3f, p[0], 1e-6f);
            Assert.Equal(-2f + (t + 1) * 1e-3f, p[1], 1e-6f);
        }
        // m after 3 steps of g = 0.5: 0.5·(1 − 0.9³) = 0.1355; v: 0.25·(1 − 0.999³) = 0.000749250...
        Assert.Equal(0.1355f, state[0], 1e-6f);
        Assert.Equal(0.25 * (1 - Math.Pow(0.999, 3)), state[2], 1e-9);
    }

    [Fact]
    public void AdamW_decays_the_parameters_before_the_update_and_Adam_adds_the_decay_to_the_gradient()
    {
        // AdamW: θ ← θ(1 − lr·wd) = 0.999, then − lr = 0.989.
        float[] p = [1f], state = new float[2];
        Optimizer.For(Settings(OptimizerKind.AdamW, 0.01f, weightDecay: 0.1)).Step(0, p, new float[] { 0.5f }, 1, state);
        Assert.Equal(0.989f, p[0], 1e-6f);
        // Adam: g = 0.5 + 0.1·1 = 0.6 goes into the moments.
        float[] q = [1f], moments = new float[2];
        Optimizer.For(Settings(OptimizerKind.Adam, 0.01f, weightDecay: 0.1)).Step(0, q, new float[] { 0.5f }, 1, moments);
        Assert.Equal(0.99f, q[0], 1e-6f);
        Assert.Equal(0.06f, moments[0], 1e-7f);
        Assert.Equal(0.001f * 0.36f, moments[1], 1e-9f);
    }

    [Fact]
    public void Nesterov_and_weight_decay_follow_torch_optim_sgd()
    {
        // g = 1; v = 1; θ −= 0.1·(g + 0.9 v) = 0.19. Then v = 1.9; θ −= 0.1·(1 + 1.71).
        float[] p = [1f], v = [0f];
        var nesterov = Optimizer.For(Settings(OptimizerKind.Nesterov, 0.1f));
        nesterov.Step(0, p, new float[] { 2f }, 2, v);
        Assert.Equal(0.81f, p[0], 1e-6f);
        nesterov.Step(1, p, new float[] { 2f }, 2, v);
        Assert.Equal(1.9f, v[0], 1e-6f);
        Assert.Equal(0.539f, p[0], 1e-6f);
        // SGD with weight decay 0.5: g = 1 + 0.5·2 = 2; θ = 2 − 0.1·2.
        float[] q = [2f];
        Optimizer.For(Settings(OptimizerKind.Sgd, 0.1f, weightDecay: 0.5)).Step(0, q, new float[] { 1f }, 1, []);
        Assert.Equal(1.8f, q[0], 1e-6f);
    }

    /// <summary>
    /// PyTorch's formulas for one element, written out plainly: torch.optim.SGD (momentum, nesterov, weight_decay) and
    /// the single-tensor torch.optim.Adam/AdamW, scalars in double as Python computes them, elements in float.
    /// </summary>
    private static void Reference(OptimizerSettings s, double lr, long step, ref float p, float gradientSum, int count, float[] state, int i, int n)
    {
        float g = gradientSum / count;
        switch (s.Kind)
        {
            case OptimizerKind.Sgd:
                if (s.WeightDecay != 0) g = g + (float)s.WeightDecay * p;
                p = p + (float)-lr * g;
                return;
            case OptimizerKind.Momentum or OptimizerKind.Nesterov:
                if (s.WeightDecay != 0) g = g + (float)s.WeightDecay * p;
                float buf = state[i] * s.Momentum + g;
                state[i] = buf;
                p = p + (float)-lr * (s.Kind == OptimizerKind.Nesterov ? g + s.Momentum * buf : buf);
                return;
            default:
                if (s.Kind == OptimizerKind.AdamW) p = p * (float)(1 - lr * s.WeightDecay);
                else if (s.WeightDecay != 0) g = g + (float)s.WeightDecay * p;
                ref float m = ref state[i], v = ref state[n + i];
                m = m + (float)(1 - s.Beta1) * (g - m);
                v = v * (float)s.Beta2;
                v = v + (float)(1 - s.Beta2) * g * g;
                double t = step + 1, stepSize = lr / (1 - Math.Pow(s.Beta1, t));
                float denom = MathF.Sqrt(v) / (float)Math.Sqrt(1 - Math.Pow(s.Beta2, t)) + (float)s.Eps;
                p = p + (float)-stepSize * m / denom;
                return;
        }
    }

    public static TheoryData<OptimizerKind, double> Kinds => new()
    {
        { OptimizerKind.Sgd, 0 }, { OptimizerKind.Sgd, 0.01 }, { OptimizerKind.Momentum, 0 }, { OptimizerKind.Momentum, 0.01 },
        { OptimizerKind.Nesterov, 0.01 }, { OptimizerKind.Adam, 0 }, { OptimizerKind.Adam, 0.01 }, { OptimizerKind.AdamW, 0.05 },
    };

    [Theory]
    [MemberData(nameof(Kinds))]
    public void Every_element_gets_the_bits_of_the_reference_whatever_the_tiles_and_the_vector_width(OptimizerKind kind, double weightDecay)
    {
        // 91 elements: the vector body and the scalar tail both run; a cosine schedule with warm-up over 6 steps.
        var settings = Settings(kind, 0.03f, weightDecay) with { Schedule = ScheduleKind.Cosine, WarmupSteps = 2, LrMin = 0.001 };
        var schedule = new LearningRateSchedule(settings, epochs: 2, stepsPerEpoch: 3);
        var optimizer = Optimizer.For(settings, epochs: 2, stepsPerEpoch: 3);
        const int n = 91;
        var rng = new Rng(9);
        float[] start = Enumerable.Range(0, n).Select(_ => (float)rng.NextGaussian()).ToArray();
        float[] whole = (float[])start.Clone(), tiled = (float[])start.Clone(), expected = (float[])start.Clone();
        int stateLength = optimizer.StateVectors * n;
        float[] wholeState = new float[stateLength], tiledState = new float[stateLength], expectedState = new float[stateLength];
        for (int step = 0; step < 6; step++)
        {
            float[] g = Enumerable.Range(0, n).Select(_ => (float)rng.NextGaussian() * 7f).ToArray();
            optimizer.Step(step, whole, g, 3, wholeState);
            // The cut of a shard or a backprop thread: tiles at odd places, each with its slice of every state vector.
            foreach (var (a, b) in new[] { (0, 5), (5, 40), (40, n) })
            {
                var tile = new StateTile(tiledState, n, a, b - a);
                optimizer.Step(step, tiled.AsSpan(a, b - a), g.AsSpan(a, b - a), 3, tile, tiled.AsSpan(a, b - a), tile);
            }
            for (int i = 0; i < n; i++) Reference(settings, schedule.At(step), step, ref expected[i], g[i], 3, expectedState, i, n);
        }
        Assert.Equal(expected.Select(BitConverter.SingleToInt32Bits), whole.Select(BitConverter.SingleToInt32Bits));
        Assert.Equal(expected.Select(BitConverter.SingleToInt32Bits), tiled.Select(BitConverter.SingleToInt32Bits));
        Assert.Equal(expectedState.Select(BitConverter.SingleToInt32Bits), wholeState.Select(BitConverter.SingleToInt32Bits));
        Assert.Equal(expectedState.Select(BitConverter.SingleToInt32Bits), tiledState.Select(BitConverter.SingleToInt32Bits));
    }

    [Fact]
    public void Schedules_give_the_rates_computed_by_hand()
    {
        var constant = new OptimizerSettings(OptimizerKind.Sgd, 1f, 0);
        var step = new LearningRateSchedule(constant with { LearningRate = 0.5f, Schedule = ScheduleKind.Step, LrStepEpochs = 2, LrGamma = 0.5 }, 6, 10);
        Assert.Equal([0.5, 0.5, 0.25, 0.125], new long[] { 0, 19, 20, 40 }.Select(step.At));

        var cosine = new LearningRateSchedule(constant with { Schedule = ScheduleKind.Cosine }, 1, 11);
        Assert.Equal(1, cosine.At(0), 12);
        Assert.Equal(0.5, cosine.At(5), 12);
        Assert.Equal(0, cosine.At(10), 12);
        var cosineToMin = new LearningRateSchedule(constant with { Schedule = ScheduleKind.Cosine, LrMin = 0.1, WarmupSteps = 2 }, 1, 11);
        Assert.Equal([0.5, 1, 1], new long[] { 0, 1, 2 }.Select(cosineToMin.At));
        Assert.Equal(0.55, cosineToMin.At(6), 12);   // halfway from step 2 to the last, step 10
        Assert.Equal(0.1, cosineToMin.At(10), 12);

        var warm = new LearningRateSchedule(constant with { WarmupSteps = 4 }, 1, 10);
        Assert.Equal([0.25, 0.5, 1, 1], new long[] { 0, 1, 3, 4 }.Select(warm.At));

        // One-cycle over 10 steps, peak at step 3 (warm-up 4): from lr/25 up to lr, then down to lr/25/1e4.
        var oneCycle = new LearningRateSchedule(constant with { Schedule = ScheduleKind.OneCycle, WarmupSteps = 4 }, 1, 10);
        Assert.Equal(0.04, oneCycle.At(0), 12);
        Assert.Equal(1 - 0.48 * 1.5, oneCycle.At(1), 12);   // 1 + (0.04 − 1)/2 · (cos(π/3) + 1)
        Assert.Equal(1 - 0.48 * 0.5, oneCycle.At(2), 12);
        Assert.Equal(1, oneCycle.At(3), 12);
        Assert.Equal(0.5 + 2e-6, oneCycle.At(6), 12);
        Assert.Equal(4e-6, oneCycle.At(9), 12);
        var toMin = new LearningRateSchedule(constant with { Schedule = ScheduleKind.OneCycle, WarmupSteps = 4, LrMin = 0 }, 1, 10);
        Assert.Equal(0, toMin.At(9));
    }

    /// <summary>
    /// torch.optim.lr_scheduler.OneCycleLR(max_lr=0.1, total_steps=T, pct_start=p), anneal cos, three_phase False, by hand:
    /// initial = 0.1/25, min = initial/1e4; phase one ends at float(p·T) − 1 (T = 7: 1.1, not a whole step), phase two at
    /// T − 1; lr = end + (start − end)/2.0 · (cos(π·pct) + 1). The doubles below are Python's for these formulas.
    /// </summary>
    [Theory]
    [InlineData(10, 0, new[] { "0x1.0624dd2f1aa00p-8", "0x1.a9fbe76c8b43ap-5", "0x1.999999999999ap-4", "0x1.8551898fc1ee6p-4", "0x1.4c7db37a37094p-4",
        "0x1.f4beefeb35d1bp-5", "0x1.3e751a0792377p-5", "0x1.347145fcb3ed5p-6", "0x1.4487b69a2163ap-8", "0x1.ad7f29abcaf48p-22" })]
    [InlineData(7, 0, new[] { "0x1.0624dd2f1aa00p-8", "0x1.91a2d08a0c2b1p-4", "0x1.7870c99f7119ep-4", "0x1.1388033d2bb9ep-4", "0x1.250f424766bb6p-5",
        "0x1.45602fb05ffd5p-7", "0x1.ad7f29abcaf48p-22" })]
    [InlineData(10, 4, new[] { "0x1.0624dd2f1aa00p-8", "0x1.cac083126e978p-6", "0x1.374bc6a7ef9dbp-4", "0x1.999999999999ap-4", "0x1.7e2980338a524p-4",
        "0x1.33334e0b25cdfp-4", "0x1.999a04f964049p-5", "0x1.999adbb8f8dabp-6", "0x1.b7084c5d9b25cp-8", "0x1.ad7f29abcaf48p-22" })]
    public void One_cycle_gives_PyTorchs_rates_to_the_last_bit(int steps, int warmup, string[] pytorch)
    {
        var settings = new OptimizerSettings(OptimizerKind.Sgd, 0.1, 0, Schedule: ScheduleKind.OneCycle, WarmupSteps: warmup);
        var schedule = new LearningRateSchedule(settings, epochs: 1, stepsPerEpoch: steps);
        Assert.Equal(pytorch.Select(Hex), Enumerable.Range(0, steps).Select(t => schedule.At(t)));
    }

    /// <summary>A C99 hexadecimal double (Python's float.hex()): 0x1.hhhp±e.</summary>
    private static double Hex(string hex)
    {
        int p = hex.IndexOf('p');
        ulong mantissa = Convert.ToUInt64(hex[4..p], 16);
        return BitConverter.Int64BitsToDouble((long)((ulong)(int.Parse(hex[(p + 1)..]) + 1023) << 52 | mantissa));
    }

    [Fact]
    public void The_rate_is_a_double_as_PyTorchs_and_a_constant_rate_gives_the_kernels_the_float_they_always_had()
    {
        // StepLR(lr=0.1, gamma=0.1) after one decay is 0.1 · 0.1 in double; a float lr would give 0.1f · 0.1 = 0.010000000149.
        var step = new LearningRateSchedule(new OptimizerSettings(OptimizerKind.Sgd, 0.1, 0, Schedule: ScheduleKind.Step, LrStepEpochs: 1), 2, 5);
        Assert.Equal(0.1 * 0.1, step.At(5));
        Assert.Equal(0.010000000000000002, step.At(5));

        // SGD and momentum round the rate to float as torch's kernels take it: the same float as the earlier float setting.
        foreach (string text in new[] { "0.1", "0.01", "0.02", "0.03", "3.0", "0.5", "1e-3", "0.002", "0.05", "0.3" })
        {
            double lr = double.Parse(text, System.Globalization.CultureInfo.InvariantCulture);
            float before = float.Parse(text, System.Globalization.CultureInfo.InvariantCulture);
            foreach (var kind in new[] { OptimizerKind.Sgd, OptimizerKind.Momentum })
            {
                float[] p = [1f, -2f, 0.25f], q = [1f, -2f, 0.25f], state = new float[3], stateBefore = new float[3];
                float[] g = [0.3f, -7f, 1e-3f];
                Optimizer.For(new OptimizerSettings(kind, lr, 0.9f)).Step(0, p, g, 3, state);
                Optimizer.For(new OptimizerSettings(kind, before, 0.9f)).Step(0, q, g, 3, stateBefore);
                Assert.Equal(q.Select(BitConverter.SingleToInt32Bits), p.Select(BitConverter.SingleToInt32Bits));
            }
        }
    }

    [Fact]
    public void The_schedule_is_fixed_by_the_run_spec_so_local_training_needs_its_length_and_an_adam_run_learns()
    {
        var data = SyntheticDigits.Create(640, 100, seed: 4);
        var spec = Presets.PyTorchMlp with
        {
            Epochs = 3, Seed = 2,
            Optimizer = new OptimizerSettings(OptimizerKind.AdamW, 1e-3f, 0, WeightDecay: 0.01, Schedule: ScheduleKind.Cosine, WarmupSteps: 5),
        };
        Assert.Equal(10, spec.Resolve(640).StepsPerEpoch);
        Assert.Equal(0, (spec with { Optimizer = Presets.PyTorchMlp.Optimizer }).Resolve(640).StepsPerEpoch);   // constant: nothing to resolve
        Assert.Contains("warmup-steps: 30 is not below the run's 30 steps", Assert.Throws<ArgumentException>(() =>
            (spec with { Optimizer = spec.Optimizer with { WarmupSteps = 30 } }).Resolve(640)).Message);
        Assert.Contains("needs the run's length", Assert.Throws<ArgumentException>(() => spec.CreateOptimizer()).Message);

        using var local = new LocalTrainer(spec, data.Train);
        double first = local.TrainEpoch(0), second = local.TrainEpoch(1), third = local.TrainEpoch(2);
        Assert.True(third < second && second < first && third < 0.8 * first, $"training loss by epoch: {first}, {second}, {third}");
    }

    [Theory]
    [InlineData("beta1", "beta1: 1 is outside [0, 1)")]
    [InlineData("beta2", "beta2: -0.1 is outside [0, 1)")]
    [InlineData("eps", "eps: 0 is not a positive finite number")]
    [InlineData("weight-decay", "weight-decay: NaN is not a non-negative finite number")]
    [InlineData("lr", "lr: -1 is not a positive finite number")]
    [InlineData("lr-float", "lr: 1E+39 is outside the range a float holds (1.4E-45 .. 3.4E+38)")]
    [InlineData("lr-float-zero", "lr: 1E-46 is outside the range a float holds (1.4E-45 .. 3.4E+38)")]
    [InlineData("gamma", "lr-gamma: -1 is not a positive finite number")]
    [InlineData("step-epochs", "lr-step-epochs: 5 is not below the run's 5 epochs")]
    [InlineData("lr-min", "lr-min: 2 is outside [0, lr 1]")]
    [InlineData("nesterov", "momentum: nesterov needs a momentum above 0")]
    public void Bad_settings_are_refused_with_the_setting_named(string what, string message)
    {
        var adam = new OptimizerSettings(OptimizerKind.Adam, 1f, 0);
        var bad = what switch
        {
            "beta1" => adam with { Beta1 = 1 },
            "beta2" => adam with { Beta2 = -0.1 },
            "eps" => adam with { Eps = 0 },
            "weight-decay" => adam with { WeightDecay = double.NaN },
            "lr" => adam with { LearningRate = -1 },
            "lr-float" => adam with { LearningRate = 1e39 },
            "lr-float-zero" => adam with { LearningRate = 1e-46 },
            "gamma" => adam with { Schedule = ScheduleKind.Step, LrStepEpochs = 1, LrGamma = -1 },
            "step-epochs" => adam with { Schedule = ScheduleKind.Step, LrStepEpochs = 5 },
            "lr-min" => adam with { Schedule = ScheduleKind.Cosine, LrMin = 2 },
            _ => adam with { Kind = OptimizerKind.Nesterov },
        };
        var spec = Presets.PyTorchMlp with { Epochs = 5, Optimizer = bad };
        Assert.Contains(message, Assert.Throws<ArgumentException>(spec.Validate).Message);
    }
}
