namespace Backprop.Core.Training;

/// <summary>Counts from evaluating some samples; partial results from workers add up exactly.</summary>
public sealed record Evaluation(int Count, int Correct, double LossSum, int Classes, int[] Confusion)
{
    public static Evaluation Empty(int classes) => new(0, 0, 0, classes, new int[classes * classes]);

    public double Accuracy => Count == 0 ? 0 : (double)Correct / Count;
    public double MeanLoss => Count == 0 ? 0 : LossSum / Count;

    /// <summary>Confusion[actual * Classes + predicted].</summary>
    public int ConfusionAt(int actual, int predicted) => Confusion[actual * Classes + predicted];

    public Evaluation Add(Evaluation other)
    {
        var confusion = new int[Confusion.Length];
        for (int i = 0; i < confusion.Length; i++) confusion[i] = Confusion[i] + other.Confusion[i];
        return new Evaluation(Count + other.Count, Correct + other.Correct, LossSum + other.LossSum, Classes, confusion);
    }
}
