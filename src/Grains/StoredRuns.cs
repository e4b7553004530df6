using Backprop.Grains.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Orleans.Storage;

namespace Backprop.Grains;

/// <summary>
/// A run's record as its coordinator last stored it, read from grain storage for the grains that must check a
/// caller's claim about a run (the shards' Attach, the run list). Read, not asked of the coordinator: the coordinator
/// is the caller awaiting the shards' Attach, and an activation's copy runs ahead of storage during a write and
/// behind it once a newer coordinator fenced it off; storage is what every coordinator and silo agrees on.
/// </summary>
internal static class StoredRuns
{
    /// <summary>The name of <see cref="RunGrain"/>'s persistent state.</summary>
    public const string StateName = "run";

    /// <summary>The stored record of <paramref name="runId"/> (a valid run id), or null when no run of that id was ever started.</summary>
    public static async Task<RunRecord?> Read(IServiceProvider services, IGrainFactory grains, string runId)
    {
        var state = new GrainState<RunRecord>();
        await services.GetRequiredKeyedService<IGrainStorage>(SiloSetup.StorageName)
            .ReadStateAsync(StateName, grains.GetGrain<IRunGrain>(runId).GetGrainId(), state);
        return state.RecordExists && state.State?.Spec is not null ? state.State : null;
    }
}
