using Backprop.Core.Training;
using Backprop.Grains.Messages;

namespace Backprop.Grains;

/// <summary>
/// The parameters of a run's best epoch so far by validation accuracy (--keep best): stored apart from the record,
/// which is written far more often, and never overwritten by a later, worse epoch.
/// </summary>
[GenerateSerializer]
public sealed class BestParameters
{
    [Id(0)] public int Epoch { get; set; }
    [Id(1)] public long Step { get; set; }
    [Id(2)] public FloatPayload? Parameters { get; set; }
}

[GenerateSerializer]
public sealed class RunRecord
{
    [Id(0)] public RunSpec? Spec { get; set; }
    [Id(1)] public RunState State { get; set; }
    [Id(2)] public List<EpochResult> Epochs { get; set; } = [];
    [Id(3)] public string? Error { get; set; }
    /// <summary>How many coordinators have driven this run; the parameter-server shards refuse blocks from older ones.</summary>
    [Id(4)] public int Incarnation { get; set; }
    [Id(5)] public List<RunEvent> Events { get; set; } = [];
    [Id(6)] public string? DatasetSha256 { get; set; }
    /// <summary>
    /// A random number drawn by each incarnation as it claims the run, never sent to a client: the shards attach only to
    /// a caller that presents it, so nobody else can knock the run's coordinator off its shards with the incarnation.
    /// </summary>
    [Id(7)] public long CoordinatorKey { get; set; }

    public RunRecord Copy() => new()
    {
        Spec = Spec, State = State, Epochs = [.. Epochs], Error = Error, Incarnation = Incarnation, Events = [.. Events], DatasetSha256 = DatasetSha256,
        CoordinatorKey = CoordinatorKey,
    };
}
