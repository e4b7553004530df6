namespace Backprop.Core.Data;

/// <summary>A data file that is missing, damaged or not what it claims; the message names the file.</summary>
public sealed class DataFileException(string path, string problem)
    : Exception($"{path}: {problem}")
{
    public string Path { get; } = path;
    public string Problem { get; } = problem;
}
