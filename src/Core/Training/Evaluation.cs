namespace Backprop.Core.Training;

/// <summary>Counts from evaluating some samples; partial results from workers add up exactly.</summary>
public sealed record Evaluation(int Count, int Correct, double LossSum, int Classes, int[] Confusion)
{
    /// <summary>Samples per evaluation call; fixed, so that the loss sum is added in the same blocks whatever the worker count.</summary>
    public const int Block = 1024;

    public static Evaluation Empty(int classes)
    {
        if (classes < 1) throw new ArgumentOutOfRangeException(nameof(classes), $"{classes} classes");
        // Evaluations travel from workers in messages.
        ResourceLimits.CheckMessageBytes(ConfusionBytes(classes), $"a confusion matrix of {classes} x {classes} classes");
        return new(0, 0, 0, classes, new int[classes * classes]);
    }

    public static long ConfusionBytes(int classes) => (long)classes * classes * sizeof(int);

    public double Accuracy => Count == 0 ? 0 : (double)Correct / Count;
    public double MeanLoss => Count == 0 ? 0 : LossSum / Count;

    /// <summary>Confusion[actual * Classes + predicted].</summary>
    public int ConfusionAt(int actual, int predicted) => Confusion[actual * Classes + predicted];

    public Evaluation Add(Evaluation other)
    {
        if (other.Classes != Classes || other.Confusion.Length != Confusion.Length)
            throw new ArgumentException($"cannot add an evaluation of {other.Classes} classes ({other.Confusion.Length} confusion counts) to one of {Classes} ({Confusion.Length})", nameof(other));
        var confusion = new int[Confusion.Length];
        for (int i = 0; i < confusion.Length; i++) confusion[i] = Confusion[i] + other.Confusion[i];
        return new Evaluation(Count + other.Count, Correct + other.Correct, LossSum + other.LossSum, Classes, confusion);
    }
}
