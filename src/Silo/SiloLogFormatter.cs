using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Logging.Console;
using Microsoft.Extensions.Options;

namespace Backprop.Silo;

public sealed class SiloLogOptions : ConsoleFormatterOptions
{
    public string SiloName { get; set; } = "silo";
}

/// <summary>One line per entry, led by the silo's name, so the logs of several silos can be read side by side.</summary>
public sealed class SiloLogFormatter(IOptionsMonitor<SiloLogOptions> options) : ConsoleFormatter(FormatterName)
{
    public const string FormatterName = "silo";

    public override void Write<TState>(in LogEntry<TState> entry, IExternalScopeProvider? scopeProvider, TextWriter writer)
    {
        var message = entry.Formatter?.Invoke(entry.State, entry.Exception);
        if (message is null && entry.Exception is null) return;
        string level = entry.LogLevel switch
        {
            LogLevel.Trace => "trce", LogLevel.Debug => "dbug", LogLevel.Information => "info",
            LogLevel.Warning => "warn", LogLevel.Error => "fail", LogLevel.Critical => "crit", _ => "none",
        };
        writer.Write($"{DateTime.Now:HH:mm:ss.fff} {options.CurrentValue.SiloName} {level}: {entry.Category}: {message}");
        if (entry.Exception is not null) writer.Write($" | {entry.Exception.GetType().Name}: {entry.Exception.Message}");
        writer.WriteLine();
    }
}
