using System.CommandLine;
using System.Globalization;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;

namespace Backprop.Client;

public static class EvalCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "Model file written by train --model-out", Required = true };
        var dataset = Cli.Dataset(fallback: null);
        var dataDir = Cli.DataDir();
        var confusionPng = new Option<string?>("--confusion-png") { Description = $"Also draw the confusion matrix, with its counts, as a {Figures.ConfusionSize}x{Figures.ConfusionSize} PNG heatmap in this file" };
        var command = new Command("eval", "Print the test accuracy, loss and confusion matrix of a saved model") { model, dataset, dataDir, confusionPng };
        command.SetAction((parse, cancel) => Cli.Guard(() =>
        {
            var contents = ModelFile.Load(parse.GetValue(model)!);
            var name = DatasetCatalog.Resolve(parse.GetValue(dataset) ?? contents.Info.GetValueOrDefault("dataset", "mnist"));
            DataCommand.Ensure(name, parse.GetValue(dataDir)!);
            var test = DatasetCatalog.LoadAny(parse.GetValue(dataDir)!, name).Test;
            if (contents.Spec.InputSize != test.Features || contents.Spec.OutputSize != test.Classes)
                throw new ArgumentException($"model {contents.Spec.Describe()} does not fit {name} ({test.Features} inputs, {test.Classes} classes)");
            var eval = new ChunkRunner(contents.Spec, 256).Evaluate(test, contents.Parameters, 0, test.Count);
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{name} test accuracy {eval.Accuracy * 100:F2}% ({eval.Correct}/{eval.Count}), mean loss {eval.MeanLoss:F4}"));
            Console.WriteLine("confusion (rows: actual, columns: predicted)");
            Console.WriteLine("      " + string.Concat(Enumerable.Range(0, eval.Classes).Select(p => $"{p,6}")));
            for (int a = 0; a < eval.Classes; a++)
                Console.WriteLine($"{a,6}" + string.Concat(Enumerable.Range(0, eval.Classes).Select(p => $"{eval.ConfusionAt(a, p),6}")));
            if (parse.GetValue(confusionPng) is { } png)
            {
                Figures.Confusion(eval.Classes, (a, p) => eval.ConfusionAt(a, p),
                    string.Create(CultureInfo.InvariantCulture, $"{name}: {eval.Accuracy * 100:F2}% of {eval.Count} test images"), png, "--confusion-png");
                Console.WriteLine($"confusion matrix drawn in {png}");
            }
            return Task.FromResult(ExitCodes.Ok);
        }));
        return command;
    }
}
