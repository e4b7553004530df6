namespace Backprop.Core.Training;

/// <summary>
/// How many steps one call to the workers covers: about a target duration of work at the last measured speed (so
/// that the coordinator looks at progress, cancel and the worker set that often), ending at the next checkpoint,
/// at the epoch's end, and before a short last step (whose cut into blocks differs). One step when no speed is known.
/// </summary>
public static class StepWindow
{
    public static int Steps(double secondsPerStep, TimeSpan target, int max, EpochPlan plan, int step, long version, int checkpointEvery)
    {
        if (step < 0 || step >= plan.Steps) throw new ArgumentOutOfRangeException(nameof(step), $"step {step} is outside 0..{plan.Steps - 1}");
        if (max < 1 || checkpointEvery < 1 || version < 0) throw new ArgumentOutOfRangeException(nameof(max), "max, checkpointEvery must be positive, version not negative");
        int steps = secondsPerStep > 0 ? (int)Math.Clamp(target.TotalSeconds / secondsPerStep, 1, max) : 1;
        steps = (int)Math.Min(steps, checkpointEvery - version % checkpointEvery);
        steps = Math.Min(steps, plan.Steps - step);
        while (steps > 1 && plan.ChunkCount(step + steps - 1) != plan.ChunkCount(step)) steps--;
        return steps;
    }
}
