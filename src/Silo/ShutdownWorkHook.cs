using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace Backprop.Silo;

/// <summary>
/// For tests only: shutdown work of a given length, so that a test can check that a stopping silo gets the time of its
/// --shutdown-timeout (a server silo's checkpoints take as long as the model is big). Registered only when
/// <see cref="Env"/> holds a number of seconds; it says in the log whether its work completed or the host's shutdown
/// timeout cut it short.
/// </summary>
public sealed class ShutdownWorkHook(TimeSpan work, ILogger<ShutdownWorkHook> log) : IHostedService
{
    public const string Env = "BACKPROP_TEST_SHUTDOWN_WORK";

    public Task StartAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        log.LogInformation("test shutdown work: {Seconds} s started", work.TotalSeconds);
        try
        {
            await Task.Delay(work, cancellationToken);
            log.LogInformation("test shutdown work: completed");
        }
        catch (OperationCanceledException)
        {
            log.LogInformation("test shutdown work: cut short by the shutdown timeout");
        }
    }
}
