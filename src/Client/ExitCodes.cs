namespace Backprop.Client;

/// <summary>Exit codes of the CLI.</summary>
public static class ExitCodes
{
    public const int Ok = 0;
    /// <summary>Other failures: the cluster could not be reached, a connection was lost.</summary>
    public const int Error = 1;
    /// <summary>Bad usage or bad input (flags, data files, model files), with a one-line message.</summary>
    public const int Usage = 2;
    public const int RunFailed = 3;
    public const int RunCancelled = 4;
    public const int Interrupted = 130;
}
