using Backprop.Core.Data;

namespace Backprop.Core.Training;

/// <summary>
/// A run's first epoch would otherwise pay the JIT for the kernels, the chunk and reduction code, the optimizer and
/// evaluation. One step and one evaluation of the run's model on a few generated samples, on a core the embedded
/// silo's start leaves idle, compiles them first. It has its own parameters, data and trainer: the run's bits do not
/// depend on it.
/// </summary>
public static class Warmup
{
    /// <summary>Models larger than this are not warmed: their parameters cost more to allocate than the JIT saves.</summary>
    public const long MaxParameters = 4_000_000;

    /// <summary>Trains one step of <paramref name="spec"/>'s model and evaluates it, on generated samples; false when skipped.</summary>
    public static bool Run(RunSpec spec, int threads)
    {
        var model = spec.Model;
        if (model.ParameterCount > MaxParameters) return false;
        int count = Math.Max(spec.BatchSize, 2) + 1, inputs = model.Layers[0], classes = model.OutputSize;
        var pixels = new byte[count * inputs];
        var labels = new byte[count];
        for (int s = 0; s < count; s++)
        {
            labels[s] = (byte)(s % classes);
            for (int k = s % 7; k < inputs; k += 7) pixels[s * inputs + k] = (byte)(37 * s + k);
        }
        var data = new Dataset("warm-up", 1, inputs, pixels, labels, classes);
        var warm = spec with { Epochs = 1, Validation = 0, TrainLimit = 0, EarlyStop = 0, Augment = RunSpec.NoAugment, StepsPerEpoch = 0 };
        using var trainer = new LocalTrainer(warm, data, threads);
        trainer.TrainEpoch(0, maxSteps: 1);
        trainer.Evaluate(data, 0, count);
        return true;
    }
}
