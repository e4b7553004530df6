namespace Backprop.Bench;

/// <summary>
/// What every bench command does with its arguments first: `--help` prints its usage (exit 0), and arguments its
/// parser refuses are one line on stderr (exit 2).
/// </summary>
internal static class BenchArgs
{
    /// <summary>The parsed options, or false with the exit code the command returns at once.</summary>
    public static bool TryParse<T>(string[] args, string command, string usage, Func<string[], T> parse, out T options, out int exitCode)
    {
        (options, exitCode) = (default!, 0);
        if (args.Contains("--help") || args.Contains("-h"))
        {
            Console.WriteLine(usage);
            return false;
        }
        try
        {
            options = parse(args);
            return true;
        }
        catch (Exception e) when (e is ArgumentException or FormatException or OverflowException)
        {
            Console.Error.WriteLine($"error: {e.Message} (see {command} --help)");
            exitCode = 2;
            return false;
        }
    }
}
