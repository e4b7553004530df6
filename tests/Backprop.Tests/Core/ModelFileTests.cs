using Backprop.Core;
using Backprop.Core.Model;

namespace Backprop.Tests.Core;

public sealed class ModelFileTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("model-tests-").FullName;
    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private readonly ModelSpec _spec = new([784, 30, 10], Activation.Sigmoid, Loss.Quadratic);

    [Fact]
    public void Round_trip_keeps_spec_parameters_and_info_exactly()
    {
        var p = Initializer.Create(_spec, InitScheme.Normal, 5);
        var path = Path.Combine(_dir, "m.bpmodel");
        ModelFile.Save(path, _spec, p, new Dictionary<string, string> { ["dataset"] = "mnist" });
        var loaded = ModelFile.Load(path);
        Assert.Equal(_spec, loaded.Spec);
        Assert.Equal(ParameterHash.Sha256(p), ParameterHash.Sha256(loaded.Parameters));
        Assert.Equal("mnist", loaded.Info["dataset"]);
    }

    [Fact]
    public void Flipped_parameter_byte_fails_the_checksum()
    {
        var path = Path.Combine(_dir, "m.bpmodel");
        ModelFile.Save(path, _spec, Initializer.Create(_spec, InitScheme.Normal, 5));
        var bytes = File.ReadAllBytes(path);
        bytes[bytes.Length / 2] ^= 0x40;
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<InvalidDataException>(() => ModelFile.Load(path));
        Assert.Contains("checksum mismatch", e.Message);
        Assert.StartsWith(path, e.Message);
    }

    [Fact]
    public void Truncated_and_foreign_files_fail_clearly()
    {
        var path = Path.Combine(_dir, "m.bpmodel");
        ModelFile.Save(path, _spec, Initializer.Create(_spec, InitScheme.Normal, 5));
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes.AsSpan(0, bytes.Length - 100).ToArray());
        Assert.Contains("not a readable", Assert.Throws<InvalidDataException>(() => ModelFile.Load(path)).Message);

        var foreign = Path.Combine(_dir, "foreign.json");
        File.WriteAllText(foreign, "{\"weights\": [1, 2, 3]}");
        Assert.Contains("not a", Assert.Throws<InvalidDataException>(() => ModelFile.Load(foreign)).Message);
    }
}
