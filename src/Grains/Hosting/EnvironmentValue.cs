using System.Globalization;

namespace Backprop.Grains.Hosting;

/// <summary>Option defaults read from environment variables (containers configure the silo and the CLI with them).</summary>
public static class EnvironmentValue
{
    /// <summary>
    /// Variable <paramref name="env"/> as a <typeparamref name="T"/> (string, int, double or bool: true/false, 1/0,
    /// yes/no), or <paramref name="fallback"/> when it is unset or empty. A value that does not parse ends the process
    /// with one line on stderr and exit code 2, as a bad flag does: it is read while the command line is parsed.
    /// </summary>
    public static T Get<T>(string env, string flag, T fallback)
    {
        if (Environment.GetEnvironmentVariable(env) is not { Length: > 0 } text) return fallback;
        var type = Nullable.GetUnderlyingType(typeof(T)) ?? typeof(T);
        object? value = type == typeof(string) ? text
            : type == typeof(int) && int.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out int i) ? i
            : type == typeof(double) && double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out double d) ? d
            : type == typeof(bool) ? Boolean(text)
            : null;
        if (value is not null) return (T)value;
        Console.Error.WriteLine($"error: {env}='{text}' (for {flag}) is not {(type == typeof(bool) ? "true or false" : type == typeof(int) ? "an integer" : "a number")}");
        Environment.Exit(2);
        return fallback;
    }

    private static bool? Boolean(string text) => text.Trim().ToLowerInvariant() switch
    {
        "true" or "1" or "yes" => true,
        "false" or "0" or "no" => false,
        _ => null,
    };
}
