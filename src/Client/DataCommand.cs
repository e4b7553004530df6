using System.CommandLine;
using Backprop.Core.Data;

namespace Backprop.Client;

public static class DataCommand
{
    public static Command Create()
    {
        var dataset = new Argument<string>("dataset") { Description = "mnist | fashion-mnist", DefaultValueFactory = _ => "mnist" };
        dataset.AcceptOnlyFromAmong([.. DatasetCatalog.Names]);
        var dataDir = Cli.DataDir();
        var fetch = new Command("fetch", "Fetch a dataset's four IDX files into the data directory and verify their SHA-256") { dataset, dataDir };
        fetch.SetAction((parse, cancel) => Cli.Guard(() =>
        {
            var dir = DataFetcher.Fetch(parse.GetValue(dataset)!, parse.GetValue(dataDir)!, line => Console.Error.WriteLine(line));
            Console.WriteLine(dir);
            return Task.FromResult(ExitCodes.Ok);
        }));
        return new Command("data", "Manage datasets") { fetch };
    }

    /// <summary>Makes sure a built-in dataset is in the data directory, fetching it with progress on stderr (a folder of the user's is read where it is).</summary>
    public static void Ensure(string dataset, string dataDir)
    {
        if (!DatasetCatalog.IsBuiltIn(dataset)) return;
        if (DatasetCatalog.IsPresent(DatasetCatalog.DirectoryOf(dataDir, dataset))) return;
        Console.Error.WriteLine($"{dataset} is not in {dataDir}; fetching it");
        DataFetcher.Fetch(dataset, dataDir, line => Console.Error.WriteLine("  " + line));
    }
}
