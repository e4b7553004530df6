namespace Backprop.Core;

/// <summary>
/// What a run id may be: it names grains ("{run}/{shard}", "{run}/{incarnation}.{generation}/{worker}"), storage
/// keys and file names, so it is short and plain.
/// </summary>
public static class RunIds
{
    public const int MaxLength = 100;

    /// <summary>Throws <see cref="ArgumentException"/> unless <paramref name="id"/> is 1..100 of A-Z a-z 0-9 . _ -, starting with a letter or digit.</summary>
    public static void Validate(string? id)
    {
        if (string.IsNullOrEmpty(id)) throw new ArgumentException("run-id: empty");
        if (id.Length > MaxLength) throw new ArgumentException($"run-id: {id.Length} characters, over the limit of {MaxLength}");
        if (!char.IsAsciiLetterOrDigit(id[0])) throw new ArgumentException($"run-id: '{id}' must start with a letter or digit");
        foreach (char c in id)
            if (!char.IsAsciiLetterOrDigit(c) && c is not ('.' or '_' or '-'))
                throw new ArgumentException($"run-id: '{id}' has '{c}'; use letters, digits, '.', '_' and '-'");
    }
}
