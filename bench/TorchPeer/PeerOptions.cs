using System.Globalization;
using Backprop.Core.Data;

namespace Backprop.TorchPeer;

/// <summary>What one libtorch peer run trains: the same knobs as the PyTorch script it stands in for.</summary>
internal sealed record PeerOptions(string DataDir, int Epochs, int Threads, int[] Layers, int Batch, double Lr, long Seed, bool Json)
{
    public const string Usage = """
        usage: dotnet run -c Release --project bench/TorchPeer -- [--data-dir DIR] [--epochs 10] [--threads 2]
                 [--layers 784,512,10] [--batch 128] [--lr 1e-3] [--seed 1] [--json]
          Trains a PyTorch-style MLP on MNIST with libtorch (TorchSharp-cpu): nn.Linear's default init, ReLU between
          layers, cross-entropy (log-softmax + NLL) on the logits, torch.optim.Adam, the training set shuffled each
          epoch by a generator seeded with --seed, pixels /255 and nothing more. Prints each epoch's training seconds
          (the training loop only, evaluation not counted), the running total and the test accuracy.
          --data-dir DIR    the data directory that `data fetch` fills [default: $BACKPROP_DATA, else ~/.cache/backprop-distributed]
          --epochs N        epochs to train [default: 10]
          --threads N       torch.set_num_threads [default: 2]
          --layers LIST     layer widths, input 784 and output 10 [default: 784,512,10]
          --batch N         mini-batch size; the last batch of an epoch is the remainder [default: 128]
          --lr X            Adam's learning rate [default: 1e-3]
          --seed N          torch.manual_seed (initial weights) and the shuffling generator's seed [default: 1]
          --json            one JSON line per epoch instead of the table
        """;

    public static PeerOptions Parse(string[] args)
    {
        var o = new PeerOptions(DatasetCatalog.DefaultDataDir(), 10, 2, [784, 512, 10], 128, 1e-3, 1, false);
        for (int i = 0; i < args.Length; i++)
        {
            string name = args[i];
            if (name == "--json") { o = o with { Json = true }; continue; }
            if (i + 1 >= args.Length || !name.StartsWith("--", StringComparison.Ordinal))
                throw new ArgumentException(name is "--data-dir" or "--epochs" or "--threads" or "--layers" or "--batch" or "--lr" or "--seed"
                    ? $"{name}: needs a value" : $"unknown argument '{name}'");
            string value = args[++i];
            o = name switch
            {
                "--data-dir" => o with { DataDir = value },
                "--epochs" => o with { Epochs = Int(name, value, 1, 1000) },
                "--threads" => o with { Threads = Int(name, value, 1, 1024) },
                "--layers" => o with { Layers = value.Split(',').Select(w => Int(name, w, 1, 1 << 16)).ToArray() },
                "--batch" => o with { Batch = Int(name, value, 1, 60_000) },
                "--lr" => o with { Lr = double.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out double lr) && lr > 0 && double.IsFinite(lr)
                    ? lr : throw new ArgumentException($"--lr: '{value}' is not a positive number") },
                "--seed" => o with { Seed = long.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out long s) && s >= 0
                    ? s : throw new ArgumentException($"--seed: '{value}' is not a whole number >= 0") },
                _ => throw new ArgumentException($"unknown argument '{name}'"),
            };
        }
        if (o.Layers.Length < 2 || o.Layers[0] != 784 || o.Layers[^1] != 10)
            throw new ArgumentException($"--layers: '{string.Join(',', o.Layers)}' must start with 784 (MNIST's pixels) and end with 10 (its classes)");
        return o;
    }

    private static int Int(string name, string value, int min, int max) =>
        int.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out int n) && n >= min && n <= max
            ? n : throw new ArgumentException($"{name}: '{value}' is not a whole number in {min}..{max}");
}
