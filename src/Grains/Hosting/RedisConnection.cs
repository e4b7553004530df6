using System.Net;
using System.Net.Security;
using System.Security.Cryptography.X509Certificates;
using StackExchange.Redis;

namespace Backprop.Grains.Hosting;

/// <summary>
/// How silos and clients reach the cluster's Redis: <c>host:port</c> as given, AUTH (<see cref="RedisPassword"/>) and
/// TLS (<see cref="RedisTls"/>). A host name stays a name: StackExchange.Redis resolves it on every connect, so a Redis
/// that comes back at another address (a rescheduled pod behind a Service name) is found again.
/// </summary>
public sealed record RedisConnection(string Host, int Port, RedisPassword? Password = null, RedisTls? Tls = null)
{
    /// <summary>The address as a user writes it (IPv6 in brackets).</summary>
    public string Endpoint => (IPAddress.TryParse(Host, out var ip) && ip.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 ? $"[{Host}]" : Host) + $":{Port}";

    /// <summary>The address and how it is reached, for messages (never the password itself).</summary>
    public string Description => $"{Endpoint} ({(Password is null ? "no password given" : Password.ToString())}{(Tls is null ? "" : ", " + Tls.Description)})";

    /// <summary>
    /// Parses "host:port" (host an IP address, IPv6 in brackets, or a DNS name; "port" alone means 127.0.0.1:port)
    /// without resolving the name; throws <see cref="ArgumentException"/> naming <paramref name="option"/>.
    /// </summary>
    public static (string Host, int Port) ParseEndpoint(string text, string option)
    {
        int colon = text.LastIndexOf(':');
        string host = colon > 0 ? text[..colon] : "127.0.0.1";
        if (!int.TryParse(text[(colon + 1)..], out int port) || port is < 1 or > 65535)
            throw new ArgumentException($"{option}: '{text}' is not host:port with a port in 1..65535");
        if (host.StartsWith('[') && host.EndsWith(']')) host = host[1..^1];
        bool valid = IPAddress.TryParse(host, out _) ? !host.Contains(':') || text.StartsWith('[') : Uri.CheckHostName(host) == UriHostNameType.Dns;
        if (!valid) throw new ArgumentException($"{option}: '{host}' in '{text}' is neither an IP address nor a host name (IPv6: [address]:port)");
        return (host, port);
    }

    /// <summary>
    /// Settings for one connection (Orleans' providers each make their own): fail when Redis does not answer within
    /// 5 s or refuses the password, instead of retrying in the background; the silo waits for Redis before it starts
    /// them (<see cref="WaitUntilAnswers"/>).
    /// </summary>
    public ConfigurationOptions Options()
    {
        var options = new ConfigurationOptions
        {
            AbortOnConnectFail = true,
            ConnectTimeout = 5000,
            Password = Password?.Value,
        };
        options.EndPoints.Add(Host, Port);
        Tls?.ApplyTo(options, Host);
        return options;
    }

    /// <summary>
    /// Connects and pings until Redis answers, for at most <paramref name="wait"/>: a Redis that is not up yet (its
    /// volume not bound, its pod not scheduled) is waited for with back-off (1 s, doubling, at most 10 s), and
    /// <paramref name="waiting"/> hears why each try failed and when the next comes. A Redis that answered and refused
    /// (the password, or a certificate this side does not trust) is not retried: that will not change by waiting.
    /// Throws <see cref="RedisUnreachableException"/> with the last reason (one line).
    /// </summary>
    public async Task WaitUntilAnswers(TimeSpan wait, Action<string, TimeSpan> waiting, CancellationToken cancel)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var delay = TimeSpan.FromSeconds(1);
        while (true)
        {
            string reason;
            bool final;
            try
            {
                await using var connection = await ConnectionMultiplexer.ConnectAsync(Options());
                await connection.GetDatabase().PingAsync();
                return;
            }
            catch (RedisConnectionException e)
            {
                reason = await Why(e);
                final = Refused(e);
            }
            catch (RedisServerException e) when (e.Message.StartsWith("LOADING", StringComparison.Ordinal) || e.Message.StartsWith("BUSY", StringComparison.Ordinal))
            {
                // Redis takes its port while it loads its data set (a large append-only file): it will answer.
                reason = OneLine(e.Message);
                final = false;
            }
            catch (RedisServerException e)
            {
                // An error reply (e.g. NOAUTH, WRONGPASS): Redis answered.
                reason = OneLine(e.Message);
                final = true;
            }
            catch (RedisTimeoutException e)
            {
                // Connected but no answer in time: a Redis that is loading or busy.
                reason = OneLine(e.Message);
                final = false;
            }
            cancel.ThrowIfCancellationRequested();
            if (final || clock.Elapsed + delay > wait)
                throw new RedisUnreachableException(clock.Elapsed > delay ? $"{reason} (tried for {clock.Elapsed.TotalSeconds:F0} s)" : reason);
            waiting(reason, delay);
            await Task.Delay(delay, cancel);
            delay = TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, TimeSpan.FromSeconds(10).Ticks));
        }
    }

    /// <summary>
    /// Why StackExchange.Redis could not connect, in one line: this side's refusal of Redis' certificate, else, for
    /// "Error connecting right now" (which says nothing of why), what a plain socket says (no such host, connection
    /// refused), else its message.
    /// </summary>
    public async Task<string> Why(RedisConnectionException e) =>
        Tls?.Rejection ?? (e.FailureType == ConnectionFailureType.UnableToConnect ? await SocketReason() : null) ?? Reason(e);

    /// <summary>Whether Redis answered and refused (the password, or this side its certificate): waiting will not change that.</summary>
    public bool Refused(RedisConnectionException e) => Tls?.Rejection is not null || e.FailureType == ConnectionFailureType.AuthenticationFailure;

    /// <summary>Why a plain TCP connection to Redis fails; null when it does not.</summary>
    private async Task<string?> SocketReason()
    {
        try
        {
            using var tcp = new System.Net.Sockets.TcpClient();
            await tcp.ConnectAsync(Host, Port).WaitAsync(TimeSpan.FromSeconds(5));
            return null;
        }
        catch (System.Net.Sockets.SocketException e)
        {
            return e.SocketErrorCode is System.Net.Sockets.SocketError.HostNotFound or System.Net.Sockets.SocketError.TryAgain or System.Net.Sockets.SocketError.NoData
                ? $"the host name {Host} does not resolve ({e.Message})"
                : $"cannot open a connection ({e.Message})";
        }
        catch (TimeoutException)
        {
            return "no answer to a connection within 5 s";
        }
    }

    /// <summary>
    /// StackExchange.Redis' message without its advice about abortConnect, which does not apply here, and with the
    /// socket's own reason where it has one ("Connection refused", a name that does not resolve).
    /// </summary>
    public static string Reason(Exception e)
    {
        string message = OneLine(e.Message.Replace("StackExchange.Redis.RedisConnectionException: ", ""));
        int advice = message.IndexOf(" To allow this multiplexer to continue retrying", StringComparison.Ordinal);
        if (advice > 0) message = message[..advice];
        var cause = e.InnerException;
        while (cause?.InnerException is not null) cause = cause.InnerException;
        return cause is null || message.Contains(cause.Message, StringComparison.Ordinal) ? message : $"{message} ({OneLine(cause.Message)})";
    }

    private static string OneLine(string s) => string.Join(' ', s.Split('\n', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries));
}

/// <summary>Redis did not answer in time, or answered with a refusal; the message is one line, without the password.</summary>
public sealed class RedisUnreachableException(string message) : Exception(message);

/// <summary>
/// TLS to Redis (<c>--redis-tls</c>): the certificate Redis presents must name the host dialled and chain to the CA in
/// <c>--redis-ca</c> alone when one is given (a custom trust store: the system's roots are not consulted), else to the
/// system's roots. Redis' <c>tls-auth-clients</c> must be <c>no</c> or <c>optional</c>: silos and clients present no
/// certificate of their own to Redis (AUTH identifies them).
/// </summary>
public sealed class RedisTls
{
    public const string Env = "BACKPROP_REDIS_TLS", CaEnv = "BACKPROP_REDIS_CA";

    private RedisTls(string? caPath, X509Certificate2Collection? authorities)
    {
        CaPath = caPath;
        _authorities = authorities;
    }

    private readonly X509Certificate2Collection? _authorities;

    /// <summary>The PEM file of the only CA trusted; null: the system's roots.</summary>
    public string? CaPath { get; }

    /// <summary>
    /// Why this side refused Redis' certificate at its last check; null when that check passed or there was none. Written
    /// by the Redis client's connection threads and read by the thread deciding whether to wait, hence volatile.
    /// </summary>
    public string? Rejection => _rejection;
    private volatile string? _rejection;

    public string Description => CaPath is null ? "TLS, the system's CAs" : $"TLS, CA {CaPath}";

    /// <summary>The options that name this again, for hints such as "re-attach with ...".</summary>
    public string Flags => "--redis-tls" + (CaPath is null ? "" : $" --redis-ca {CaPath}");

    /// <summary>
    /// TLS as --redis-tls and --redis-ca ask: null without TLS. Throws <see cref="ArgumentException"/> (one line, naming
    /// the option) for a CA file that is missing or holds no PEM certificate, and for --redis-ca without --redis-tls.
    /// </summary>
    public static RedisTls? Load(bool tls, string? caPath)
    {
        caPath = string.IsNullOrWhiteSpace(caPath) ? null : caPath;
        if (!tls)
        {
            if (caPath is not null) throw new ArgumentException("--redis-ca: given without --redis-tls");
            return null;
        }
        return new RedisTls(caPath, caPath is null ? null : TlsFiles.LoadAuthorities(caPath, "--redis-ca"));
    }

    internal void ApplyTo(ConfigurationOptions options, string host)
    {
        options.Ssl = true;
        options.SslHost = host;
        options.CertificateValidation += Validate;
    }

    private bool Validate(object sender, X509Certificate? presented, X509Chain? chain, SslPolicyErrors errors)
    {
        string? reason;
        if (presented is not X509Certificate2 certificate) reason = "Redis presented no certificate";
        else if (errors.HasFlag(SslPolicyErrors.RemoteCertificateNameMismatch)) reason = $"Redis' certificate '{certificate.Subject}' does not name the host dialled";
        else if (_authorities is null) reason = errors == SslPolicyErrors.None ? null : $"Redis' certificate '{certificate.Subject}' is not trusted by this system ({errors})";
        else reason = TlsFiles.ChainError(certificate, _authorities, chain) is { } error ? $"Redis' certificate is not signed by the CA in {CaPath}: {error}" : null;
        _rejection = reason;
        return reason is null;
    }
}
