using System.Diagnostics;
using System.Numerics;
using System.Runtime.Intrinsics;
using System.Text.Json;
using Backprop.Core.Data;
using Backprop.TorchPeer;
using TorchSharp;
using static TorchSharp.torch;

// The libtorch peer of the README's time-to-accuracy figures: what PyTorch's CPU kernels need on the machine of
// the day for the same MNIST task, so that a preset's seconds are compared with a peer measured beside them.

if (args.Contains("--help") || args.Contains("-h"))
{
    Console.WriteLine(PeerOptions.Usage);
    return 0;
}
PeerOptions o;
TrainTest data;
try
{
    o = PeerOptions.Parse(args);
    data = DatasetCatalog.Load(DatasetCatalog.DirectoryOf(o.DataDir, "mnist"), "mnist");
}
catch (Exception e) when (e is ArgumentException or DataFileException or IOException)
{
    Console.Error.WriteLine($"error: {e.Message} (see TorchPeer --help)");
    return 2;
}

LibStdCxxCompat.Apply();
torch.set_num_threads(o.Threads);
torch.manual_seed(o.Seed);
var shuffle = new Generator((ulong)o.Seed);
using var trainX = Pixels(data.Train);
using var trainY = Labels(data.Train);
using var testX = Pixels(data.Test);
using var testY = Labels(data.Test);

var layers = new List<(string, nn.Module<Tensor, Tensor>)>();
for (int l = 0; l + 1 < o.Layers.Length; l++)
{
    if (l > 0) layers.Add(($"relu{l}", nn.ReLU()));
    layers.Add(($"fc{l + 1}", nn.Linear(o.Layers[l], o.Layers[l + 1])));
}
using var model = nn.Sequential(layers);
using var adam = optim.Adam(model.parameters(), lr: o.Lr);

int vectorBits = Vector<float>.Count * 32;
bool vector512 = Vector512.IsHardwareAccelerated;
string layersText = string.Join(',', o.Layers);
if (!o.Json)
{
    Console.WriteLine($"libtorch {torch.__version__} (TorchSharp-cpu), {o.Threads} threads, {layersText} ReLU, Adam lr {o.Lr}, batch {o.Batch}, seed {o.Seed};"
        + $" .NET vectors {vectorBits} bit, Vector512 {vector512}");
    Console.WriteLine("epoch  train s  total s  test accuracy");
}

long n = trainY.shape[0];
double total = 0, best = 0, last = 0;
for (int epoch = 1; epoch <= o.Epochs; epoch++)
{
    model.train();
    var clock = Stopwatch.StartNew();
    using (var order = randperm(n, generator: shuffle))
    {
        for (long start = 0; start < n; start += o.Batch)
        {
            using var step = NewDisposeScope();
            var rows = order.narrow(0, start, Math.Min(o.Batch, n - start));
            var loss = nn.functional.cross_entropy(model.forward(trainX.index_select(0, rows)), trainY.index_select(0, rows));
            adam.zero_grad();
            loss.backward();
            adam.step();
        }
    }
    double seconds = clock.Elapsed.TotalSeconds;
    total += seconds;
    last = Accuracy();
    best = Math.Max(best, last);
    if (o.Json)
        Console.WriteLine(JsonSerializer.Serialize(new
        {
            peer = "libtorch", torch = torch.__version__, threads = o.Threads, layers = layersText, batch = o.Batch, lr = o.Lr, seed = o.Seed,
            vectorBits, vector512, epoch, trainSeconds = Math.Round(seconds, 4), cumulativeTrainSeconds = Math.Round(total, 4),
            testAccuracy = Math.Round(last, 6), bestAccuracy = Math.Round(best, 6),
        }));
    else
        Console.WriteLine($"{epoch,5}  {seconds,7:F3}  {total,7:F3}  {last * 100:F2}%");
}
if (!o.Json)
    Console.WriteLine($"total training seconds {total:F2}; test accuracy best {best * 100:F2}%, last {last * 100:F2}%; torch {torch.__version__};"
        + $" .NET vectors {vectorBits} bit, Vector512 {vector512}");
return 0;

double Accuracy()
{
    model.eval();
    using var _ = no_grad();
    using var scope = NewDisposeScope();
    long correct = model.forward(testX).argmax(1).eq(testY).sum().item<long>();
    return (double)correct / testY.shape[0];
}

static Tensor Pixels(Dataset set)
{
    var values = new float[set.Pixels.Length];
    for (int i = 0; i < values.Length; i++) values[i] = set.Pixels[i] / 255f;
    return tensor(values, [set.Count, set.Rows * set.Cols]);
}

static Tensor Labels(Dataset set) => tensor(set.Labels.Select(l => (long)l).ToArray(), [set.Count]);
