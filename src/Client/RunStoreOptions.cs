using System.CommandLine;

namespace Backprop.Client;

/// <summary>
/// Where commands on stored runs (resume, runs, plot) find them: a running cluster (the cluster options), else the
/// runs the embedded silo stored under --data-dir.
/// </summary>
public sealed class RunStoreOptions
{
    public ClusterAddressOptions Address { get; } = new("A running cluster's gateways; without them (or --redis), the runs stored by the embedded silo under --data-dir");

    public Option<string> DataDir { get; } = Cli.DataDir();

    public void AddTo(Command command)
    {
        Address.AddTo(command);
        command.Add(DataDir);
    }

    /// <summary>Whether these options name no cluster: the commands act on the runs stored under --data-dir.</summary>
    public bool IsEmbedded(ParseResult parse) => Address.Parse(parse, fallbackGateway: null) is null;

    /// <summary>A client of the cluster given, else an embedded silo over the stored runs whose workers use <paramref name="threads"/> threads.</summary>
    public Task<ClusterConnection> Open(ParseResult parse, int threads, CancellationToken cancel) =>
        Address.Parse(parse, fallbackGateway: null) is { } cluster
            ? ClusterConnection.Connect(cluster, cancel)
            : ClusterConnection.StartEmbedded(parse.GetValue(DataDir)!, threads, cancel);
}
