using Backprop.Core.Training;
using Backprop.Grains.Messages;

namespace Backprop.Grains;

/// <summary>
/// Each worker's compute time over the last <see cref="Steps"/> steps of its generation, from the replies to the
/// windows of steps (no call of its own): a reply sums its worker's compute over the window, so every step of a window
/// counts with the window's mean. From it, <see cref="WorkerStats"/> per worker and which workers are stragglers: a
/// median over <see cref="StragglerFactor"/> times the median of all workers' medians, judged once every worker has
/// <see cref="MinSteps"/> steps, so that one unlucky window (a pause, the first step's warm-up) names nobody. An event
/// marks each change only (becomes one, stops being one).
/// </summary>
internal sealed class WorkerTimes
{
    public const int Steps = WorkerStats.Steps;
    public const int MinSteps = 50;
    public const double StragglerFactor = WorkerStats.StragglerFactor;
    /// <summary>A straggler stays one until its median is back under this factor, so that a worker near the line does not flap.</summary>
    public const double ClearFactor = 1.25;

    /// <summary>Compute seconds per step (scaled to an average block) of the steps of one window.</summary>
    private readonly record struct Sample(double Seconds, int Steps);

    private sealed class Worker(string silo)
    {
        public readonly List<Sample> Samples = [];
        public string Silo = silo;
        public int Held, Blocks;
        public bool Straggler;
    }

    private readonly SortedDictionary<int, Worker> _workers = [];
    private readonly Sample[] _sorted = new Sample[Steps];

    /// <summary>The last figures, for the run's status.</summary>
    public WorkerStats[] Stats { get; private set; } = [];

    /// <summary>A new generation of workers: they are measured from scratch. Returns the stragglers' end, as events.</summary>
    public List<(string Kind, string Message)> Reset(int generation)
    {
        var ended = _workers.Where(w => w.Value.Straggler)
            .Select(w => ("straggler-cleared", $"worker {w.Key} on {w.Value.Silo} is measured no more: generation {generation} of workers replaced it"))
            .ToList();
        _workers.Clear();
        Stats = [];
        return ended;
    }

    /// <summary>
    /// A window whose every call answered (worker b computed block b of each step): adds each reply's compute per step,
    /// and returns the workers that became or stopped being stragglers, as events.
    /// </summary>
    public List<(string Kind, string Message)> Add(ReadOnlySpan<BlockDone?> replies, ChunkBlocks cut)
    {
        double averageBlock = cut.Chunks / (double)cut.Count;
        for (int b = 0; b < replies.Length; b++)
        {
            if (replies[b] is not { Applied: > 0 } reply) continue;
            if (!_workers.TryGetValue(b, out var worker)) _workers[b] = worker = new Worker(reply.Silo);
            worker.Silo = reply.Silo;
            worker.Blocks += reply.Applied;
            double perStep = reply.ComputeSeconds / reply.Applied * averageBlock / (cut.End(b) - cut.First(b));
            worker.Samples.Add(new Sample(perStep, Math.Min(reply.Applied, Steps)));
            worker.Held += worker.Samples[^1].Steps;
            // The oldest window's steps go first, the oldest in part where the window straddles the limit.
            while (worker.Held > Steps)
            {
                var oldest = worker.Samples[0];
                int excess = worker.Held - Steps;
                if (oldest.Steps <= excess) worker.Samples.RemoveAt(0);
                else worker.Samples[0] = oldest with { Steps = oldest.Steps - excess };
                worker.Held -= Math.Min(oldest.Steps, excess);
            }
        }
        return Judge();
    }

    private List<(string Kind, string Message)> Judge()
    {
        var stats = _workers.Select(w => new WorkerStats(w.Key, w.Value.Silo, w.Value.Blocks, Quantile(w.Value, 0.5), Quantile(w.Value, 0.95), w.Value.Straggler)).ToArray();
        var (median, _) = WorkerStats.Typical(stats);
        var changes = new List<(string, string)>();
        // Until every worker has enough steps (a worker that got its first block just now), nobody's flag changes.
        if (stats.Length < 2 || median <= 0 || _workers.Values.Any(w => w.Held < MinSteps))
        {
            Stats = stats;
            return changes;
        }
        int i = 0;
        foreach (var worker in _workers.Values)
        {
            var s = stats[i];
            double ratio = s.Slowdown(stats);
            bool straggler = ratio > (worker.Straggler ? ClearFactor : StragglerFactor);
            stats[i++] = s with { Straggler = straggler };
            if (straggler == worker.Straggler) continue;
            worker.Straggler = straggler;
            changes.Add(straggler
                ? ("straggler", s.Slower(stats))
                : ("straggler-cleared", $"worker {s.Worker} on {s.Silo} is back under {ClearFactor}x the median ({ratio:0.0}x now)"));
        }
        Stats = stats;
        return changes;
    }

    /// <summary>The q-quantile (nearest rank) of a worker's step times, every step of a window counted.</summary>
    private double Quantile(Worker worker, double q)
    {
        if (worker.Held == 0) return 0;
        // At most Steps samples: each holds a step or more.
        var sorted = _sorted.AsSpan(0, worker.Samples.Count);
        worker.Samples.CopyTo(sorted);
        sorted.Sort(static (a, b) => a.Seconds.CompareTo(b.Seconds));
        int rank = Math.Max(1, (int)Math.Ceiling(q * worker.Held)), seen = 0;
        foreach (var sample in sorted)
            if ((seen += sample.Steps) >= rank) return sample.Seconds;
        return sorted[^1].Seconds;
    }
}
