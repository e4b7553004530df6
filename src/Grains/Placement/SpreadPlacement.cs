using Orleans.Placement;
using Orleans.Runtime;
using Orleans.Runtime.Placement;

namespace Backprop.Grains.Placement;

/// <summary>
/// Puts worker i of a run on silo (i mod n) of the compatible silos in address order. The built-in
/// strategies pile a burst of first activations onto one silo (ORLEANS-10-FACTS); this spreads them exactly.
/// Keys end in "/{index}".
/// </summary>
[GenerateSerializer, Immutable]
public sealed class SpreadPlacementStrategy : PlacementStrategy
{
    public static readonly SpreadPlacementStrategy Instance = new();
}

[AttributeUsage(AttributeTargets.Class)]
public sealed class SpreadPlacementAttribute() : PlacementAttribute(SpreadPlacementStrategy.Instance);

public sealed class SpreadPlacementDirector : IPlacementDirector
{
    public Task<SiloAddress> OnAddActivation(PlacementStrategy strategy, PlacementTarget target, IPlacementContext context)
    {
        var silos = context.GetCompatibleSilos(target).OrderBy(s => s.ToParsableString(), StringComparer.Ordinal).ToArray();
        if (silos.Length == 0) throw new OrleansException($"no compatible silo for {target.GrainIdentity}");
        return Task.FromResult(silos[IndexOf(target.GrainIdentity.Key.ToString()!) % silos.Length]);
    }

    internal static int IndexOf(string key)
    {
        int slash = key.LastIndexOf('/');
        return slash >= 0 && int.TryParse(key.AsSpan(slash + 1), out int index) && index >= 0 ? index : 0;
    }
}
