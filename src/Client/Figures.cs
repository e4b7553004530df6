using ScottPlot;

namespace Backprop.Client;

/// <summary>The PNG figures of the CLI: learning curves of one or more runs (`plot`), a confusion matrix (`eval --confusion-png`).</summary>
public static class Figures
{
    public const int CurvesWidth = 1500, CurvesHeight = 500, ConfusionSize = 800;

    /// <summary>
    /// Three panels side by side: train (dashed) and test (solid) loss, test accuracy, and samples/s per epoch; one
    /// colour per run, named in the legends.
    /// </summary>
    public static void Curves(IReadOnlyList<RunCurves> runs, string path, string flag)
    {
        var palette = new ScottPlot.Palettes.Category10();
        // Losses fall and the others rise: each legend sits where its curves are not.
        Plot loss = Panel("Loss", "loss", Alignment.UpperRight), accuracy = Panel("Test accuracy", "accuracy (%)", Alignment.LowerRight),
            speed = Panel("Training speed", "samples/s", Alignment.LowerRight);
        for (int i = 0; i < runs.Count; i++)
        {
            var run = runs[i];
            var color = palette.GetColor(i);
            double[] epochs = [.. run.Epochs.Select(e => (double)e.Epoch)];
            Line(loss, epochs, [.. run.Epochs.Select(e => e.TrainLoss)], color, $"{run.Label} train", LinePattern.Dashed);
            Line(loss, epochs, [.. run.Epochs.Select(e => e.TestLoss)], color, $"{run.Label} test", LinePattern.Solid);
            Line(accuracy, epochs, [.. run.Epochs.Select(e => e.TestAccuracy * 100)], color, run.Label, LinePattern.Solid);
            Line(speed, epochs, [.. run.Epochs.Select(e => e.SamplesPerSecond)], color, run.Label, LinePattern.Solid);
        }
        speed.Axes.SetLimitsY(0, Math.Max(1, runs.SelectMany(r => r.Epochs).Max(e => e.SamplesPerSecond)) * 1.1);

        var figure = new Multiplot();
        // A new multiplot holds one empty plot of its own.
        foreach (var empty in figure.GetPlots()) figure.RemovePlot(empty);
        foreach (var panel in (Plot[])[loss, accuracy, speed]) figure.AddPlot(panel);
        figure.Layout = new ScottPlot.MultiplotLayouts.Columns();
        Write(path, flag, () => figure.Render(CurvesWidth, CurvesHeight));
    }

    /// <summary>A heatmap of the counts (rows: actual class, top to bottom; columns: predicted), each cell with its count.</summary>
    public static void Confusion(int classes, Func<int, int, long> count, string title, string path, string flag)
    {
        var plot = new Plot();
        var cells = new double[classes, classes];
        double max = 1;
        for (int a = 0; a < classes; a++)
            for (int p = 0; p < classes; p++)
                max = Math.Max(max, cells[a, p] = count(a, p));
        var heatmap = plot.Add.Heatmap(cells);
        heatmap.Colormap = new ScottPlot.Colormaps.Viridis();
        // Row 0 of the data is drawn at the top: actual class a sits at y = classes - 1 - a.
        heatmap.Extent = new CoordinateRect(-0.5, classes - 0.5, -0.5, classes - 0.5);
        for (int a = 0; a < classes; a++)
            for (int p = 0; p < classes; p++)
            {
                var text = plot.Add.Text(((long)cells[a, p]).ToString(System.Globalization.CultureInfo.InvariantCulture), p, classes - 1 - a);
                text.LabelAlignment = Alignment.MiddleCenter;
                text.LabelFontSize = classes <= 10 ? 14 : 9;
                // Viridis is dark at the low end: light text there, dark text on the bright cells.
                text.LabelFontColor = cells[a, p] > max * 0.6 ? Colors.Black : Colors.White;
            }
        plot.Add.ColorBar(heatmap);
        double[] positions = [.. Enumerable.Range(0, classes).Select(i => (double)i)];
        string[] names = [.. Enumerable.Range(0, classes).Select(i => i.ToString(System.Globalization.CultureInfo.InvariantCulture))];
        plot.Axes.Bottom.SetTicks(positions, names);
        plot.Axes.Left.SetTicks([.. positions.Reverse()], names);
        plot.Axes.Bottom.Label.Text = "predicted";
        plot.Axes.Left.Label.Text = "actual";
        plot.Title(title);
        plot.Axes.SetLimits(-0.5, classes - 0.5, -0.5, classes - 0.5);
        Write(path, flag, () => plot.GetImage(ConfusionSize, ConfusionSize));
    }

    private static Plot Panel(string title, string yLabel, Alignment legend)
    {
        var plot = new Plot();
        plot.Title(title);
        plot.Axes.Bottom.Label.Text = "epoch";
        plot.Axes.Left.Label.Text = yLabel;
        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic { IntegerTicksOnly = true };
        plot.ShowLegend(legend);
        return plot;
    }

    private static void Line(Plot plot, double[] xs, double[] ys, Color color, string label, LinePattern pattern)
    {
        var line = plot.Add.Scatter(xs, ys, color);
        line.LegendText = label;
        line.LinePattern = pattern;
        line.LineWidth = 2;
        line.MarkerSize = 6;
    }

    /// <summary>Renders and writes the PNG; a path that cannot be written is bad input, named by <paramref name="flag"/>.</summary>
    private static void Write(string path, string flag, Func<Image> render)
    {
        byte[] png;
        using (var image = render()) png = image.GetImageBytes(ImageFormat.Png);
        try
        {
            if (Path.GetDirectoryName(Path.GetFullPath(path)) is { } dir) Directory.CreateDirectory(dir);
            File.WriteAllBytes(path, png);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"{flag}: cannot write {path}: {e.Message}");
        }
    }
}
