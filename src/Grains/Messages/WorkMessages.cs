using Backprop.Core.Training;

namespace Backprop.Grains.Messages;

/// <summary>Parameters of one version (the number of optimizer steps applied so far).</summary>
[GenerateSerializer, Immutable]
public sealed record ParameterVersion([property: Id(0)] long Step, [property: Id(1)] FloatPayload Parameters);

/// <summary>
/// Compute the gradient sums of some chunks of one step. The worker rebuilds the epoch plan from the spec,
/// so only chunk numbers travel, never sample indices or data.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record ChunkWork(
    [property: Id(0)] RunSpec Spec,
    [property: Id(1)] int Epoch,
    [property: Id(2)] int Step,
    [property: Id(3)] int[] Chunks,
    [property: Id(4)] ParameterVersion Parameters);

[GenerateSerializer, Immutable]
public sealed record ChunkResult(
    [property: Id(0)] int Chunk,
    [property: Id(1)] FloatPayload GradientSum,
    [property: Id(2)] double LossSum,
    [property: Id(3)] int Samples);

[GenerateSerializer, Immutable]
public sealed record ChunkResults([property: Id(0)] ChunkResult[] Results, [property: Id(1)] string Silo);

/// <summary>Evaluate test samples [Start, End) under the given parameters.</summary>
[GenerateSerializer, Immutable]
public sealed record EvalWork(
    [property: Id(0)] RunSpec Spec,
    [property: Id(1)] int Start,
    [property: Id(2)] int End,
    [property: Id(3)] FloatPayload Parameters);
