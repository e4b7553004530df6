using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Model;
using Backprop.Core.Numerics;
using Backprop.Core.Training;

namespace Backprop.Tests.Core;

/// <summary>Users' own dataset folders (IDX or CSV), their one-line errors, and the validation split.</summary>
public sealed class OwnDatasetTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("own-data-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Folder(string name, string train, string test)
    {
        var dir = Path.Combine(_dir, name);
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, DatasetCatalog.TrainCsv), train);
        File.WriteAllText(Path.Combine(dir, DatasetCatalog.TestCsv), test);
        return dir;
    }

    [Fact]
    public void A_csv_folder_loads_with_a_header_and_its_classes_from_the_largest_training_label()
    {
        var dir = Folder("csv", "label,a,b,c\r\n0,0,128,255\r\n2,1,2,3\r\n", "1,9,8,7\n0,255,0,0\n");
        var data = DatasetCatalog.LoadOwn(dir);
        Assert.Equal(2, data.Train.Count);
        Assert.Equal(2, data.Test.Count);
        Assert.Equal(3, data.Train.Features);
        Assert.Equal((1, 3), (data.Train.Rows, data.Train.Cols));
        Assert.Equal(3, data.Train.Classes);   // label 2 in the training file
        Assert.Equal(3, data.Test.Classes);
        Assert.Equal(new byte[] { 0, 128, 255, 1, 2, 3 }, data.Train.Pixels);
        Assert.Equal(new byte[] { 0, 2 }, data.Train.Labels);
        Assert.Equal(new byte[] { 1, 0 }, data.Test.Labels);
    }

    [Fact]
    public void A_test_label_outside_the_training_labels_classes_is_one_line_naming_the_test_file()
    {
        var csv = Folder("test-label", "label,a\n0,1\n2,3\n", "label,a\n1,9\n3,255\n");
        var e = Assert.Throws<DataFileException>(() => DatasetCatalog.LoadOwn(csv));
        Assert.Equal(Path.Combine(csv, "test.csv: line 3: label 3 is outside the training file's classes 0..2"), e.Message);

        var data = SyntheticDigits.Create(trainCount: 30, testCount: 10, seed: 3, side: 5, classes: 3);
        var idx = Path.Combine(_dir, "idx-test-label");
        IdxWriter.WriteDataset(idx, data);
        byte[] labels = (byte[])data.Test.Labels.Clone();
        labels[7] = 3;
        IdxWriter.WriteLabels(Path.Combine(idx, DatasetCatalog.TestLabels), labels);
        e = Assert.Throws<DataFileException>(() => DatasetCatalog.LoadOwn(idx));
        Assert.Equal(Path.Combine(idx, DatasetCatalog.TestLabels + ": label 3 at index 7 is outside 0..2"), e.Message);
    }

    [Fact]
    public void A_csv_line_longer_than_the_cap_is_refused_with_its_line_before_it_is_read_whole()
    {
        // A row of the widest input fits; a line of 1 Mi + 1 characters (no line break) does not.
        string widest = "1," + string.Join(',', Enumerable.Repeat("255", ResourceLimits.MaxLayerWidth)) + "\n";
        Assert.True(widest.Length < CsvReader.MaxLineChars);
        var dir = Folder("long", "0,1\n1,2\n" + new string('7', CsvReader.MaxLineChars + 1), "0,1\n");
        var e = Assert.Throws<DataFileException>(() => DatasetCatalog.LoadOwn(dir));
        Assert.Equal(Path.Combine(dir, $"train.csv: line 3: longer than {CsvReader.MaxLineChars} characters"), e.Message);
        File.WriteAllText(Path.Combine(dir, DatasetCatalog.TrainCsv), "0,1\n1,2\n" + new string('7', CsvReader.MaxLineChars));
        Assert.Contains("train.csv: line 3: a label and no values", Assert.Throws<DataFileException>(() => DatasetCatalog.LoadOwn(dir)).Message);

        var wide = Folder("wide", widest + widest, widest);
        Assert.Equal(ResourceLimits.MaxLayerWidth, DatasetCatalog.LoadOwn(wide).Train.Features);
    }

    [Fact]
    public void Csv_lines_end_at_a_lone_cr_as_at_lf_and_crlf_and_the_cap_holds_for_each()
    {
        var data = DatasetCatalog.LoadOwn(Folder("cr", "label,a,b\r0,1,2\r1,3,4\r", "0,1,2\r\n1,5,6\n0,7,8"));
        Assert.Equal(new byte[] { 0, 1 }, data.Train.Labels);
        Assert.Equal(new byte[] { 1, 2, 3, 4 }, data.Train.Pixels);
        Assert.Equal(new byte[] { 0, 1, 0 }, data.Test.Labels);
        Assert.Equal(new byte[] { 1, 2, 5, 6, 7, 8 }, data.Test.Pixels);

        // A "\r\n" cut by the reader's 64 Ki-character buffer is one line end: the '\r' is the buffer's last character.
        string first = "0," + new string(' ', (1 << 16) - 4) + "1\r\n";
        Assert.Equal('\r', first[(1 << 16) - 1]);
        Assert.Equal(new byte[] { 0, 1, 1 }, DatasetCatalog.LoadOwn(Folder("cut", first + "1,2\r\n1,3\r\n", "0,1\n")).Train.Labels);

        var dir = Folder("cr-long", "0,1\r1,2\r" + new string('7', CsvReader.MaxLineChars + 1) + "\r", "0,1\r");
        Assert.Equal(Path.Combine(dir, $"train.csv: line 3: longer than {CsvReader.MaxLineChars} characters"),
            Assert.Throws<DataFileException>(() => DatasetCatalog.LoadOwn(dir)).Message);
    }

    [Fact]
    public void Square_csv_rows_are_images()
    {
        var row = string.Join(',', Enumerable.Repeat("7", 16));
        var data = DatasetCatalog.LoadOwn(Folder("square", $"1,{row}\n", $"0,{row}\n"));
        Assert.Equal((4, 4), (data.Train.Rows, data.Train.Cols));
        Assert.Equal(2, data.Train.Classes);
    }

    [Theory]
    [InlineData("0,1,2\n1,1,2,3\n", "train.csv: line 2: 3 values, but line 1 has 2")]
    [InlineData("label,x,y\n0,1,2\n1,2\n", "train.csv: line 3: 1 values, but line 2 has 2")]
    [InlineData("0,1,2\nx,1,2\n", "train.csv: line 2: label 'x' is not an integer")]
    [InlineData("0,1,2\n1.5,1,2\n", "train.csv: line 2: label '1.5' is not an integer")]
    [InlineData("0,1,2\n-1,1,2\n", "train.csv: line 2: label '-1' is not an integer")]
    [InlineData("0,1,2\n256,1,2\n", "train.csv: line 2: label 256 is outside 0..255")]
    [InlineData("0,1,2\n1,1,300\n", "train.csv: line 2: value 300 in column 3 is outside 0..255")]
    [InlineData("0,1,2\n1,1,\n", "train.csv: line 2: value '' in column 3 is not an integer")]
    [InlineData("0,1,2\n\n1,1,2\n", "train.csv: line 2: empty line")]
    [InlineData("0,1,2\r\r\n1,1,2\r\n", "train.csv: line 2: empty line")]
    [InlineData("0,1,2\r1,\u001b[2J,2\r", "train.csv: line 2: value '\\u001B[2J' in column 2 is not an integer")]
    [InlineData("0,1,2\n\t1,1,2\n", "train.csv: line 2: label '\\u00091' is not an integer")]
    [InlineData("", "train.csv: empty file")]
    [InlineData("label,x\n", "train.csv: no samples (only a header)")]
    [InlineData("5\n", "train.csv: line 1: a label and no values")]
    public void A_bad_training_file_is_one_line_naming_the_file_and_line(string train, string message)
    {
        var dir = Folder("bad", train, "0,1,2\n");
        var e = Assert.Throws<DataFileException>(() => DatasetCatalog.LoadOwn(dir));
        Assert.Equal(Path.Combine(dir, message), e.Message);
        Assert.DoesNotContain(e.Message, char.IsControl);
    }

    [Fact]
    public void A_test_file_with_another_row_width_than_the_training_file_names_its_line()
    {
        var dir = Folder("widths", "0,1,2\n1,3,4\n", "0,1,2\n1,1,2,3\n");
        var e = Assert.Throws<DataFileException>(() => DatasetCatalog.LoadOwn(dir));
        Assert.Equal(Path.Combine(dir, "test.csv: line 2: 3 values, but the training file's rows have 2"), e.Message);
    }

    [Fact]
    public void An_idx_folder_of_any_image_size_and_class_count_loads_and_mismatched_counts_are_refused()
    {
        var data = SyntheticDigits.Create(trainCount: 30, testCount: 10, seed: 3, side: 5, classes: 3);
        var dir = Path.Combine(_dir, "idx");
        IdxWriter.WriteDataset(dir, data, gzip: true);
        var loaded = DatasetCatalog.LoadOwn(dir);
        Assert.Equal((5, 5, 30, 10), (loaded.Train.Rows, loaded.Train.Cols, loaded.Train.Count, loaded.Test.Count));
        Assert.Equal(data.Train.Labels.Max() + 1, loaded.Train.Classes);
        Assert.Equal(data.Train.Pixels, loaded.Train.Pixels);

        IdxWriter.WriteLabels(Path.Combine(dir, DatasetCatalog.TestLabels + ".gz"), data.Test.Labels.AsSpan(0, 9));
        var e = Assert.Throws<DataFileException>(() => DatasetCatalog.LoadOwn(dir));
        Assert.Equal(Path.Combine(dir, DatasetCatalog.TestLabels + ".gz: has 9 labels but t10k-images-idx3-ubyte.gz has 10 images"), e.Message);
    }

    [Fact]
    public void A_folder_without_data_files_or_that_is_missing_says_what_it_needs()
    {
        var empty = Path.Combine(_dir, "empty");
        Directory.CreateDirectory(empty);
        Assert.Contains("neither train.csv and test.csv nor the four IDX files", Assert.Throws<DataFileException>(() => DatasetCatalog.LoadOwn(empty)).Message);
        var missing = Path.Combine(_dir, "missing");
        Assert.Equal($"{missing}: no such folder (a dataset folder must be at the same path on every silo)",
            Assert.Throws<DataFileException>(() => DatasetCatalog.LoadOwn(missing)).Message);
    }

    [Theory]
    [InlineData("relative/path")]
    [InlineData("/a/../b")]
    [InlineData("/a/b/")]
    [InlineData("/a\nb")]
    [InlineData("")]
    public void A_run_names_a_built_in_set_or_a_normalised_absolute_folder(string dataset)
    {
        Assert.StartsWith("dataset: unknown", Assert.Throws<ArgumentException>(() => DatasetCatalog.Validate(dataset)).Message);
        DatasetCatalog.Validate("/a/b");
        DatasetCatalog.Validate("mnist");
        Assert.Equal("mnist", DatasetCatalog.Resolve("mnist"));
        Assert.Equal(Path.Combine(Environment.CurrentDirectory, "mine"), DatasetCatalog.Resolve("mine/"));
        Assert.Equal("/a/b", DatasetCatalog.Resolve("/a/../a/b/"));
    }

    [Fact]
    public async Task A_silo_reads_a_folder_put_in_place_after_a_failed_load_and_identifies_it_by_its_content()
    {
        var cache = Cache();
        var dir = Path.Combine(_dir, "later");
        await Assert.ThrowsAsync<DataFileException>(() => cache.Get(dir));

        var data = SyntheticDigits.Create(trainCount: 20, testCount: 5, seed: 8, side: 4, classes: 2);
        IdxWriter.WriteDataset(dir, data);
        Assert.Equal(data.Train.Pixels, (await cache.Get(dir)).Train.Pixels);
        Assert.Equal(Backprop.Grains.Hosting.DatasetCache.Sha256Of(DatasetCatalog.LoadOwn(dir)), await cache.Sha256(dir));
        await Assert.ThrowsAsync<ArgumentException>(() => cache.Get("relative/folder"));
    }

    [Fact]
    public void Shift2_moves_each_image_by_its_own_shift_from_seed_epoch_and_index()
    {
        // Sample i: one bright pixel at the centre of a 5x5 image.
        const int count = 200;
        var pixels = new byte[count * 25];
        for (int i = 0; i < count; i++) pixels[i * 25 + 12] = 255;
        var data = new Dataset("dot", 5, 5, pixels, new byte[count], 1);
        var shifted = data.Shifted(seed: 3, epoch: 1);
        var rows = new float[count * 25];
        int[] all = [.. Enumerable.Range(0, count)];
        shifted.CopyInputs(all, rows);
        var seen = new HashSet<(int, int)>();
        for (int i = 0; i < count; i++)
        {
            int at = Array.IndexOf(rows, 1f, i * 25, 25) - i * 25;
            var (dx, dy) = (at % 5 - 2, at / 5 - 2);
            Assert.Equal(24, rows.AsSpan(i * 25, 25).Count(0f));
            seen.Add((dx, dy));
            // The same sample alone, or in another order, gets the same shift.
            var alone = new float[25];
            shifted.CopyInputs([i], alone);
            Assert.Equal(rows.AsSpan(i * 25, 25).ToArray(), alone);
        }
        Assert.Equal(25, seen.Count);   // every shift in -2..2 x -2..2 occurs
        var other = new float[count * 25];
        data.Shifted(seed: 3, epoch: 2).CopyInputs(all, other);
        Assert.NotEqual(rows, other);
        // The unshifted set is untouched.
        data.CopyInputs([0], other);
        Assert.Equal(1f, other[12]);
    }

    private Backprop.Grains.Hosting.DatasetCache Cache() => new(Path.Combine(_dir, "data"), allowFetch: false,
        Microsoft.Extensions.Logging.Abstractions.NullLogger<Backprop.Grains.Hosting.DatasetCache>.Instance);

    [Fact]
    public async Task A_silo_holds_a_folders_last_two_versions_by_content_and_reads_it_again_when_its_files_change()
    {
        var cache = Cache();
        var dir = Path.Combine(_dir, "versions");
        var first = SyntheticDigits.Create(trainCount: 20, testCount: 5, seed: 8, side: 4, classes: 2);
        var second = SyntheticDigits.Create(trainCount: 24, testCount: 5, seed: 9, side: 4, classes: 2);
        var third = SyntheticDigits.Create(trainCount: 28, testCount: 5, seed: 10, side: 4, classes: 2);
        IdxWriter.WriteDataset(dir, first);
        var (loaded, sha1) = await cache.Current(dir);
        Assert.Equal(first.Train.Pixels, loaded.Train.Pixels);

        // The files change while the silo runs: a new run gets the second version, a run of the first keeps its copy.
        IdxWriter.WriteDataset(dir, second);
        var (now, sha2) = await cache.Current(dir);
        Assert.NotEqual(sha1, sha2);
        Assert.Equal(second.Train.Pixels, now.Train.Pixels);
        Assert.Equal(sha2, await cache.Sha256(dir));
        Assert.Equal(second.Train.Pixels, (await cache.Get(dir, sha2)).Train.Pixels);
        Assert.Same(loaded, await cache.Get(dir, sha1));

        // A third version: the first, no longer on disk, is the oldest of three and dropped; its runs get one line naming the
        // folder and both hashes. The second is still held.
        IdxWriter.WriteDataset(dir, third);
        var (_, sha3) = await cache.Current(dir);
        var e = await Assert.ThrowsAsync<Backprop.Grains.DataMismatchException>(() => cache.Get(dir, sha1));
        Assert.Equal($"{dir}: its files hash to sha256 {sha3}, which differs from the run's {sha1} (changed since the run started?)", e.Message);
        Assert.Same(now, await cache.Get(dir, sha2));
        Assert.Contains(sha1, (await Assert.ThrowsAsync<Backprop.Grains.DataMismatchException>(() => Cache().Get(dir, sha1))).Message);

        // Put back, the first version is read again for the run that asks for it.
        IdxWriter.WriteDataset(dir, first);
        Assert.Equal(first.Train.Pixels, (await cache.Get(dir, sha1)).Train.Pixels);
        Assert.Equal(sha1, await cache.Sha256(dir));
    }

    [Fact]
    public async Task A_failed_reread_of_a_changed_folder_keeps_the_copy_the_running_runs_train_on()
    {
        var cache = Cache();
        var dir = Path.Combine(_dir, "half-written");
        var data = SyntheticDigits.Create(trainCount: 20, testCount: 5, seed: 8, side: 4, classes: 2);
        IdxWriter.WriteDataset(dir, data);
        var (loaded, sha) = await cache.Current(dir);

        // The next version is being copied in (a file cut short): a new run is refused with the file's error...
        var labels = Path.Combine(dir, DatasetCatalog.TrainLabels);
        File.WriteAllBytes(labels, File.ReadAllBytes(labels)[..10]);
        var e = await Assert.ThrowsAsync<DataFileException>(() => cache.Current(dir));
        Assert.StartsWith(labels, e.Message);
        // (and the files, unchanged since, are not read again for every message that asks: the same error, no read)
        Assert.Same(e, await Assert.ThrowsAsync<DataFileException>(() => cache.Current(dir)));
        Assert.Same(e, await Assert.ThrowsAsync<DataFileException>(() => cache.Get(dir, "0000")));
        // ...while the run that started on the earlier files keeps its copy, at every epoch end and worker activation.
        Assert.Same(loaded, await cache.Get(dir, sha));
        Assert.Same(loaded, await cache.Get(dir, sha));

        // Once the copy is complete, a new run gets it.
        var next = SyntheticDigits.Create(trainCount: 22, testCount: 5, seed: 5, side: 4, classes: 2);
        IdxWriter.WriteDataset(dir, next);
        Assert.Equal(next.Train.Labels, (await cache.Get(dir)).Train.Labels);
        Assert.Same(loaded, await cache.Get(dir, sha));
    }

    [Fact]
    public async Task A_silo_looks_only_at_a_folders_data_files_for_changes()
    {
        var cache = Cache();
        var dir = Path.Combine(_dir, "with-others");
        IdxWriter.WriteDataset(dir, SyntheticDigits.Create(trainCount: 20, testCount: 5, seed: 8, side: 4, classes: 2));
        var (loaded, sha) = await cache.Current(dir);

        // Other files and folders beside the data are not listed: the copy held is still the folder as it is now.
        File.WriteAllText(Path.Combine(dir, "notes.txt"), "labelled by hand");
        Directory.CreateDirectory(Path.Combine(dir, "raw"));
        File.WriteAllText(Path.Combine(dir, "raw", "scan-0001.png"), "");
        Assert.Same(loaded, await cache.Get(dir));

        // A data file that appears is a change: the gzip copy beside the raw file (the raw one is read; the same content).
        var images = Path.Combine(dir, DatasetCatalog.TrainImages);
        using (var gz = new System.IO.Compression.GZipStream(File.Create(images + ".gz"), System.IO.Compression.CompressionLevel.Fastest))
            gz.Write(File.ReadAllBytes(images));
        var (reread, same) = await cache.Current(dir);
        // Read again, the same content: the copy held stays the one every run shares, not a second copy.
        Assert.Same(loaded, reread);
        Assert.Equal(sha, same);
    }

    private static RunSpec Spec(int validation) => new(
        new ModelSpec([25, 8, 3], Activation.Relu, Loss.CrossEntropy), InitScheme.PyTorch, new OptimizerSettings(OptimizerKind.Momentum, 0.05f, 0.9f),
        BatchSize: 16, ChunkSize: 4, Epochs: 2, Workers: 1, Seed: 5, Dataset: "/own", TrainLimit: 0, Validation: validation);

    [Fact]
    public void Validation_holds_out_images_drawn_from_the_seed_which_are_never_trained_on()
    {
        var data = SyntheticDigits.Create(trainCount: 100, testCount: 10, seed: 4, side: 5, classes: 3);
        int[] held = RunSpec.HeldOut(seed: 5, available: 100, count: 30);
        // Fixed by (seed, size, count): the same again, another for another seed, and not the last 30 (nor any 30 in a row).
        Assert.Equal(held, RunSpec.HeldOut(5, 100, 30));
        Assert.NotEqual(held, RunSpec.HeldOut(6, 100, 30));
        Assert.NotEqual(Enumerable.Range(70, 30), held);
        Assert.True(held[^1] - held[0] > 29, string.Join(',', held));
        Assert.Equal(30, held.Distinct().Count());
        Assert.All(held, i => Assert.InRange(i, 0, 99));

        // Training on the others, in their order, is training without validation on exactly those images.
        int[] rest = [.. Enumerable.Range(0, 100).Except(held)];
        using var withHeld = new LocalTrainer(Spec(validation: 30), data.Train);
        using var without = new LocalTrainer(Spec(validation: 0), data.Train.Select(rest));
        for (int e = 0; e < 2; e++) Assert.Equal(without.TrainEpoch(e), withHeld.TrainEpoch(e));
        Assert.Equal(without.Parameters, withHeld.Parameters);
        var (train, validation) = Spec(30).Split(data.Train);
        Assert.Equal(rest.Select(i => data.Train.Labels[i]), train.Labels);
        Assert.Equal(held.Select(i => data.Train.Labels[i]), validation.Labels);

        // The validation images evaluated in the cluster's blocks: the same counts as evaluating those images directly.
        var evaluated = withHeld.EvaluateValidation();
        var direct = new ChunkRunner(Spec(0).Model, 4).Evaluate(data.Train.Select(held), withHeld.Parameters, 0, 30);
        Assert.Equal((30, direct.Correct, direct.LossSum), (evaluated.Count, evaluated.Correct, evaluated.LossSum));
        var inputs = new float[2 * 25];
        validation.CopyInputs([0, 29], inputs);
        var expected = new float[2 * 25];
        data.Train.CopyInputs([held[0], held[29]], expected);
        Assert.Equal(expected, inputs);
    }

    [Fact]
    public void A_views_images_are_not_taken_for_its_own_so_nothing_writes_or_hashes_the_wrong_images()
    {
        var data = SyntheticDigits.Create(trainCount: 30, testCount: 5, seed: 4, side: 5, classes: 3);
        var view = data.Train.Select([3, 1, 2]);
        var shifted = data.Train.Shifted(seed: 1, epoch: 0);
        Assert.Throws<InvalidOperationException>(() => view.Pixels);
        Assert.Throws<InvalidOperationException>(() => shifted.Pixels);
        Assert.Throws<InvalidOperationException>(() => Backprop.Grains.Hosting.DatasetCache.Sha256Of(new TrainTest(view, data.Test)));
        var dir = Path.Combine(_dir, "view");
        Assert.Throws<InvalidOperationException>(() => IdxWriter.WriteDataset(dir, new TrainTest(data.Train, shifted)));
        Assert.Throws<InvalidOperationException>(() => IdxWriter.WriteDataset(dir, new TrainTest(view, data.Test)));
        // All the training images (Take of as many as there are is the set itself) are its own.
        Assert.Same(data.Train.Pixels, data.Train.Take(30).Pixels);
        Assert.Throws<InvalidOperationException>(() => data.Train.Take(29).Pixels);
    }

    [Fact]
    public void The_train_limit_takes_the_first_images_that_are_not_held_out()
    {
        var data = SyntheticDigits.Create(trainCount: 50, testCount: 5, seed: 4, side: 5, classes: 3);
        var (train, validation) = (Spec(10) with { TrainLimit = 20 }).Split(data.Train);
        int[] held = RunSpec.HeldOut(5, 50, 10);
        Assert.Equal(Enumerable.Range(0, 50).Except(held).Take(20).Select(i => data.Train.Labels[i]), train.Labels);
        Assert.Equal(10, validation.Count);
        Assert.Equal(20, (Spec(10) with { TrainLimit = 20 }).TrainCount(50));
    }

    [Theory]
    [InlineData(-1, 0, false, "validation: -1 is negative")]
    [InlineData(10, -1, false, "early-stop: patience -1 is negative")]
    [InlineData(0, 2, false, "early-stop: needs --validation")]
    [InlineData(0, 0, true, "keep: best needs --validation")]
    public void Validation_settings_are_checked(int validation, int patience, bool keepBest, string message)
    {
        var spec = Spec(validation) with { EarlyStop = patience, KeepBest = keepBest };
        Assert.StartsWith(message, Assert.Throws<ArgumentException>(spec.Validate).Message);
    }

    [Fact]
    public void A_validation_split_as_large_as_the_training_set_is_refused()
    {
        var data = SyntheticDigits.Create(trainCount: 20, testCount: 5, seed: 4, side: 5, classes: 3);
        Assert.StartsWith("validation: 20 held-out images leave none of the 20 training images",
            Assert.Throws<ArgumentException>(() => Spec(20).ValidateAgainst(data.Train)).Message);
        Assert.Throws<ArgumentException>(() => new LocalTrainer(Spec(25), data.Train));
    }
}
