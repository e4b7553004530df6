using System.Net;
using System.Net.Security;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Orleans.Configuration;
using Orleans.Connections.Security;

namespace Backprop.Grains.Hosting;

/// <summary>
/// The certificates of TLS with mutual authentication, loaded and checked once at start: this process'
/// certificate with its private key (PEM certificate + PEM key, or one PFX), and the CA that signed every peer's
/// certificate. A peer is accepted when its certificate chains to that CA alone (a custom trust store: the
/// system's roots are never consulted), carries the extended key usage its role needs (a silo serverAuth and
/// clientAuth, a client clientAuth) and, where this side dialled, names the address it dialled, or the
/// <see cref="PeerName"/> every silo's certificate carries (Kubernetes: pod IPs change, a name does not).
/// </summary>
public sealed class TlsFiles
{
    public const string CertEnv = "BACKPROP_TLS_CERT", KeyEnv = "BACKPROP_TLS_KEY", CaEnv = "BACKPROP_TLS_CA", PeerNameEnv = "BACKPROP_TLS_PEER_NAME";

    /// <summary>The extended key usages (RFC 5280) the roles need, by the names openssl and the messages use.</summary>
    private static readonly Dictionary<string, string> Purposes = new()
    {
        ["serverAuth"] = "1.3.6.1.5.5.7.3.1",
        ["clientAuth"] = "1.3.6.1.5.5.7.3.2",
    };

    /// <summary>A silo accepts connections and dials other silos: its certificate is both a server's and a client's.</summary>
    internal static readonly string[] SiloPurposes = ["serverAuth", "clientAuth"];
    internal static readonly string[] ClientPurposes = ["clientAuth"];
    internal static readonly string[] GatewayPurposes = ["serverAuth"];

    private TlsFiles(X509Certificate2? certificate, X509Certificate2Collection authorities, string? certPath, string? keyPath, string caPath, string? peerName)
    {
        Certificate = certificate;
        Authorities = authorities;
        CertPath = certPath;
        KeyPath = keyPath;
        CaPath = caPath;
        PeerName = peerName;
    }

    /// <summary>This side's certificate, with its private key; null for a client that presents none.</summary>
    public X509Certificate2? Certificate { get; }

    /// <summary>The only trust anchors for the peers' certificates.</summary>
    public X509Certificate2Collection Authorities { get; }

    public string? CertPath { get; }
    public string? KeyPath { get; }
    public string CaPath { get; }

    /// <summary>
    /// The DNS name every silo's certificate must carry in its subject alternative names; null: a dialled silo or
    /// gateway must name the IP address dialled instead.
    /// </summary>
    public string? PeerName { get; }

    /// <summary>The options that name these files again, for hints such as "re-attach with ...".</summary>
    public string Flags => (CertPath is null ? "" : $"--tls-cert {CertPath} ") + (KeyPath is null ? "" : $"--tls-key {KeyPath} ") + $"--tls-ca {CaPath}"
        + (PeerName is null ? "" : $" --tls-peer-name {PeerName}");

    private string PeerCheck => PeerName is null ? "" : $", silos must carry the name {PeerName}";

    public string Description => Certificate is { } c
        ? $"TLS: certificate '{c.Subject}' (expires {c.NotAfter:yyyy-MM-dd}), peers must be signed by {CaPath}{PeerCheck}"
        : $"TLS: no certificate of its own, the cluster must be signed by {CaPath}{PeerCheck}";

    /// <summary>
    /// Loads the files named by --tls-cert / --tls-key / --tls-ca (and takes --tls-peer-name); null when none is
    /// given (no TLS). Throws <see cref="ArgumentException"/> with a one-line message naming the option when a file
    /// is missing, unreadable or not what it should be, or when the key does not match the certificate.
    /// A silo (<paramref name="silo"/>) must have its own certificate, and it must be one its peers accept: chained
    /// to the CA, serverAuth and clientAuth, and carrying the peer name when one is set. A client's certificate, if
    /// it has one, must allow clientAuth (Orleans would refuse to present it).
    /// </summary>
    public static TlsFiles? Load(string? certPath, string? keyPath, string? caPath, string? peerName, bool silo)
    {
        certPath = Blank(certPath);
        keyPath = Blank(keyPath);
        caPath = Blank(caPath);
        peerName = Blank(peerName);
        if (certPath is null && keyPath is null && caPath is null && peerName is null) return null;
        if (caPath is null) throw new ArgumentException("--tls-ca: needed with --tls-cert/--tls-key/--tls-peer-name (the CA that signed the peers' certificates)");
        if (keyPath is not null && certPath is null) throw new ArgumentException("--tls-key: given without --tls-cert");
        if (certPath is null && silo) throw new ArgumentException("--tls-cert: needed with --tls-ca (this side's certificate)");
        if (peerName is not null && Uri.CheckHostName(peerName) != UriHostNameType.Dns)
            throw new ArgumentException($"--tls-peer-name: '{peerName}' is not a DNS name");

        var authorities = LoadAuthorities(caPath, "--tls-ca");
        var certificate = certPath is null ? null : LoadCertificate(certPath, keyPath);
        if (certificate is not null && silo)
        {
            if (ChainError(certificate, authorities, null) is { } error)
                throw new ArgumentException($"--tls-cert: {certPath} is not accepted by the CA in {caPath}: {error}");
            if (UsageError(certificate, SiloPurposes) is { } usage)
                throw new ArgumentException($"--tls-cert: {certPath}: {usage} (a silo's certificate needs serverAuth and clientAuth)");
            if (peerName is not null && !NamesHost(certificate, peerName))
                throw new ArgumentException($"--tls-cert: {certPath} does not carry --tls-peer-name {peerName} in its subject alternative names (its peers would refuse it)");
        }
        if (certificate is not null && !silo && UsageError(certificate, ClientPurposes) is { } clientUsage)
            throw new ArgumentException($"--tls-cert: {certPath}: {clientUsage} (a client's certificate needs clientAuth)");
        return new TlsFiles(certificate, authorities, certPath, keyPath, caPath, peerName);
    }

    /// <summary>
    /// Why <paramref name="certificate"/> may not be used for every one of <paramref name="purposes"/>; null when
    /// it may. Stricter than RFC 5280, which lets a certificate without the extension serve any purpose: the
    /// extension must be there, so a certificate made for something else is not a silo by accident.
    /// </summary>
    public static string? UsageError(X509Certificate2 certificate, IEnumerable<string> purposes)
    {
        var usages = certificate.Extensions.OfType<X509EnhancedKeyUsageExtension>().SingleOrDefault()?.EnhancedKeyUsages;
        var has = usages is null ? [] : usages.Cast<Oid>().Select(o => o.Value).ToHashSet();
        var missing = purposes.Where(p => !has.Contains(Purposes[p])).ToList();
        return missing.Count == 0 ? null : $"'{certificate.Subject}' lacks the extended key usage {string.Join(" and ", missing)}";
    }

    /// <summary>Whether the certificate's subject alternative names hold <paramref name="name"/> (exactly: no wildcard, not the CN).</summary>
    public static bool NamesHost(X509Certificate2 certificate, string name) =>
        certificate.MatchesHostname(name, allowWildcards: false, allowCommonName: false);

    /// <summary>Why <paramref name="certificate"/> does not chain to <paramref name="authorities"/>; null when it does.</summary>
    public static string? ChainError(X509Certificate2 certificate, X509Certificate2Collection authorities, X509Chain? presented)
    {
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.AddRange(authorities);
        // Development CAs publish no revocation lists; revocation is by replacing the CA.
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        // The path is the CA file and what the peer sent: never a fetch of a URL named in a peer's certificate (AIA),
        // which an unauthenticated dialler of the silo port could point anywhere, inside the handshake.
        chain.ChainPolicy.DisableCertificateDownloads = true;
        // Intermediates the peer sent with its certificate may complete the path; they are not trusted themselves.
        if (presented is not null)
            foreach (var element in presented.ChainElements)
                if (!element.Certificate.Equals(certificate)) chain.ChainPolicy.ExtraStore.Add(element.Certificate);
        if (chain.Build(certificate)) return null;
        var problems = chain.ChainStatus.Select(s => s.StatusInformation.Trim()).Where(s => s.Length > 0).Distinct();
        return $"'{certificate.Subject}': {string.Join("; ", problems.DefaultIfEmpty("chain not built"))}";
    }

    /// <summary>
    /// The validation of one kind of connection: the peer's certificate chains to the CA only, allows
    /// <see cref="Peer.Purposes"/>, and names the peer: the peer name where one is set (silos and gateways), else,
    /// where this side dialled, the address dialled.
    /// </summary>
    internal bool Accept(X509Certificate2 certificate, X509Chain? presented, SslPolicyErrors errors, Peer peer, Action<string>? rejected)
    {
        string? reason = ChainError(certificate, Authorities, presented) ?? UsageError(certificate, peer.Purposes);
        if (reason is null && PeerName is not null && (peer.IsSilo || peer.Dialled) && !NamesHost(certificate, PeerName))
            reason = $"'{certificate.Subject}' does not carry the name {PeerName} in its subject alternative names";
        // Set only where this side dialled and named the target (see SetTargetHost): the address, or the peer name.
        else if (reason is null && peer.Dialled && errors.HasFlag(SslPolicyErrors.RemoteCertificateNameMismatch))
            reason = $"'{certificate.Subject}' does not name the address it was reached at";
        if (reason is null) return true;
        rejected?.Invoke($"{reason} ({peer.What}; checked against {CaPath})");
        return false;
    }

    /// <summary>
    /// The name an outgoing connection checks the peer's certificate against: the peer name when set, else the address
    /// dialled (the development certificates name 127.0.0.x).
    /// </summary>
    internal void SetTargetHost(Microsoft.AspNetCore.Connections.ConnectionContext connection, TlsClientAuthenticationOptions options)
    {
        if (PeerName is not null) options.TargetHost = PeerName;
        else if (connection.RemoteEndPoint is IPEndPoint ip) options.TargetHost = ip.Address.ToString();
    }

    /// <summary>What the other end of one kind of connection must be.</summary>
    internal sealed record Peer(string What, string[] Purposes, bool IsSilo, bool Dialled)
    {
        /// <summary>Someone connected to this silo's silo port: only a silo may.</summary>
        public static readonly Peer SiloInbound = new("connected to the silo port, where only silos may", SiloPurposes, IsSilo: true, Dialled: false);
        /// <summary>Someone connected to this silo's gateway port: a client.</summary>
        public static readonly Peer GatewayInbound = new("connected to the gateway port", ClientPurposes, IsSilo: false, Dialled: false);
        /// <summary>This silo dialled another silo.</summary>
        public static readonly Peer SiloOutbound = new("a silo this silo dialled", SiloPurposes, IsSilo: true, Dialled: true);
        /// <summary>Someone connected to this silo's data lane: only a silo may.</summary>
        public static readonly Peer LaneInbound = new("connected to the data lane, where only silos may", SiloPurposes, IsSilo: true, Dialled: false);
        /// <summary>This silo dialled another silo's data lane.</summary>
        public static readonly Peer LaneOutbound = new("a silo's data lane this silo dialled", SiloPurposes, IsSilo: true, Dialled: true);
        /// <summary>This client dialled a gateway (a silo).</summary>
        public static readonly Peer GatewayOutbound = new("the gateway this client dialled", GatewayPurposes, IsSilo: true, Dialled: true);
    }

    /// <summary>The PEM certificates in <paramref name="path"/>; errors name <paramref name="option"/>.</summary>
    internal static X509Certificate2Collection LoadAuthorities(string path, string option)
    {
        var collection = new X509Certificate2Collection();
        try
        {
            collection.ImportFromPem(Read(path, option));
        }
        catch (CryptographicException e)
        {
            throw new ArgumentException($"{option}: {path}: not a PEM certificate ({OneLine(e.Message)})");
        }
        if (collection.Count == 0) throw new ArgumentException($"{option}: {path} holds no PEM certificate");
        return collection;
    }

    private static X509Certificate2 LoadCertificate(string certPath, string? keyPath)
    {
        if (keyPath is null)
        {
            // Without a key, the certificate must be a PFX (PKCS#12, no password) that holds its key.
            if (!File.Exists(certPath)) throw new ArgumentException($"--tls-cert: {certPath}: no such file");
            if (IsPem(certPath)) throw new ArgumentException($"--tls-key: needed with a PEM certificate ({certPath})");
            X509Certificate2 pfx;
            try
            {
                pfx = X509CertificateLoader.LoadPkcs12FromFile(certPath, null);
            }
            catch (CryptographicException e)
            {
                throw new ArgumentException($"--tls-cert: {certPath}: neither PEM nor a PFX without password ({OneLine(e.Message)})");
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new ArgumentException($"--tls-cert: cannot read {certPath}: {OneLine(e.Message)}");
            }
            if (!pfx.HasPrivateKey) throw new ArgumentException($"--tls-cert: {certPath} holds no private key");
            return pfx;
        }

        X509Certificate2 certificate;
        try
        {
            certificate = X509Certificate2.CreateFromPem(Read(certPath, "--tls-cert"));
        }
        catch (CryptographicException e)
        {
            throw new ArgumentException($"--tls-cert: {certPath}: not a PEM certificate ({OneLine(e.Message)})");
        }
        string keyText = Read(keyPath, "--tls-key");
        try
        {
            X509Certificate2 withKey;
            switch (certificate.PublicKey.Oid.Value)
            {
                case "1.2.840.113549.1.1.1":
                    using (var rsa = RSA.Create()) { rsa.ImportFromPem(keyText); withKey = certificate.CopyWithPrivateKey(rsa); }
                    break;
                case "1.2.840.10045.2.1":
                    using (var ec = ECDsa.Create()) { ec.ImportFromPem(keyText); withKey = certificate.CopyWithPrivateKey(ec); }
                    break;
                default:
                    throw new ArgumentException($"--tls-cert: {certPath}: unsupported key algorithm {certificate.PublicKey.Oid.FriendlyName} (RSA or ECDSA)");
            }
            // Through PKCS#12 so that the key is usable by SslStream on every platform (not an ephemeral key).
            return X509CertificateLoader.LoadPkcs12(withKey.Export(X509ContentType.Pkcs12), null);
        }
        catch (Exception e) when (e is ArgumentException or CryptographicException && !e.Message.StartsWith("--tls-", StringComparison.Ordinal))
        {
            // ImportFromPem: no key of the certificate's algorithm in the file; CopyWithPrivateKey: another key pair.
            throw new ArgumentException($"--tls-key: {keyPath} is not the private key of the certificate in {certPath} ({OneLine(e.Message)})");
        }
    }

    private static string Read(string path, string option)
    {
        try
        {
            return File.ReadAllText(path);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new ArgumentException($"{option}: {path}: no such file");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"{option}: cannot read {path}: {OneLine(e.Message)}");
        }
    }

    private static bool IsPem(string path)
    {
        try
        {
            using var reader = new StreamReader(path);
            var buffer = new char[4096];
            return new string(buffer, 0, reader.ReadBlock(buffer)).Contains("-----BEGIN ", StringComparison.Ordinal);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"--tls-cert: cannot read {path}: {OneLine(e.Message)}");
        }
    }

    private static string? Blank(string? s) => string.IsNullOrWhiteSpace(s) ? null : s;

    private static string OneLine(string s) => string.Join(' ', s.Split('\n', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries));
}

/// <summary>Orleans' TLS (Microsoft.Orleans.Connections.Security) configured from <see cref="TlsFiles"/>.</summary>
public static class TlsHosting
{
    /// <summary>
    /// Silo-to-silo and client-to-gateway connections of this silo use TLS, both ways: it presents its certificate
    /// when it accepts and when it dials, and requires and checks the peer's, clients included. Each of the three
    /// kinds of connection has its own options (what Orleans' UseTls does with one), because each expects another
    /// kind of peer: only a silo certificate is let in on the silo port, a client's on the gateway port.
    /// </summary>
    public static ISiloBuilder UseBackpropTls(this ISiloBuilder silo, TlsFiles tls)
    {
        var certificate = tls.Certificate ?? throw new ArgumentException("a silo needs its own certificate");
        // Orleans logs only that a handshake failed; this says whose certificate and why.
        var log = new RejectionLog();
        silo.Services.AddSingleton(log);
        silo.Services.AddSingleton(new LaneTls(tls, log.Rejected));
        silo.Services.AddSingleton<ILifecycleParticipant<ISiloLifecycle>>(sp =>
        {
            log.Logger = sp.GetRequiredService<ILoggerFactory>().CreateLogger("Backprop.Tls");
            return log;
        });
        TlsOptions For(TlsFiles.Peer peer)
        {
            var options = new TlsOptions { LocalCertificate = certificate };
            Configure(options, tls, peer, log.Rejected);
            return options;
        }
        return silo.Configure<SiloConnectionOptions>(connections =>
        {
            connections.ConfigureSiloInboundConnection(b => b.UseServerTls(For(TlsFiles.Peer.SiloInbound)));
            connections.ConfigureGatewayInboundConnection(b => b.UseServerTls(For(TlsFiles.Peer.GatewayInbound)));
            connections.ConfigureSiloOutboundConnection(b => b.UseClientTls(For(TlsFiles.Peer.SiloOutbound)));
        });
    }

    private sealed class RejectionLog : ILifecycleParticipant<ISiloLifecycle>
    {
        public ILogger? Logger { get; set; }

        public void Rejected(string reason) => Logger?.LogWarning("TLS: refused a peer: {Reason}", reason);

        public void Participate(ISiloLifecycle lifecycle) { }
    }

    /// <summary>
    /// The client's connections to gateways use TLS: it checks the gateway's certificate and presents its own,
    /// if it has one (silos refuse a client without one). <paramref name="rejected"/> hears why a gateway's
    /// certificate was refused, for the caller's error message.
    /// </summary>
    public static IClientBuilder UseBackpropTls(this IClientBuilder client, TlsFiles tls, Action<string>? rejected = null) => client.UseTls(options =>
    {
        options.LocalCertificate = tls.Certificate;
        Configure(options, tls, TlsFiles.Peer.GatewayOutbound, rejected);
        if (tls.Certificate is null) options.ClientCertificateMode = RemoteCertificateMode.NoCertificate;
    });

    private static void Configure(TlsOptions options, TlsFiles tls, TlsFiles.Peer peer, Action<string>? rejected)
    {
        options.RemoteCertificateMode = RemoteCertificateMode.RequireCertificate;
        options.ClientCertificateMode = RemoteCertificateMode.RequireCertificate;
        options.RemoteCertificateValidation = (certificate, chain, errors) => tls.Accept(certificate, chain, errors, peer, rejected);
        options.OnAuthenticateAsClient = tls.SetTargetHost;
    }
}

/// <summary>
/// TLS of a silo's data lane (<see cref="DataLane"/>): the silo's own certificate both ways, and the checks of its silo
/// connections (the CA, serverAuth and clientAuth, the peer name or the address dialled), refusals logged the same way.
/// </summary>
public sealed class LaneTls
{
    private readonly TlsFiles _files;
    private readonly Action<string>? _rejected;

    /// <summary>The versions Orleans' silo and gateway ports allow (its TlsOptions.SslProtocols default).</summary>
    internal const System.Security.Authentication.SslProtocols Protocols = System.Security.Authentication.SslProtocols.Tls12 | System.Security.Authentication.SslProtocols.Tls13;

    internal LaneTls(TlsFiles files, Action<string>? rejected)
    {
        if (files.Certificate is null) throw new ArgumentException("a silo needs its own certificate");
        (_files, _rejected) = (files, rejected);
    }

    internal SslServerAuthenticationOptions Server => new()
    {
        ServerCertificate = _files.Certificate,
        ClientCertificateRequired = true,
        // As the silo port (Orleans' TlsOptions.SslProtocols default), not whatever the platform still allows.
        EnabledSslProtocols = Protocols,
        AllowRenegotiation = false,
        CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
        RemoteCertificateValidationCallback = (_, certificate, chain, errors) => Accept(certificate, chain, errors, TlsFiles.Peer.LaneInbound),
    };

    internal SslClientAuthenticationOptions Client(IPEndPoint dialled) => new()
    {
        TargetHost = _files.PeerName ?? dialled.Address.ToString(),
        ClientCertificates = [_files.Certificate!],
        EnabledSslProtocols = Protocols,
        AllowRenegotiation = false,
        CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
        RemoteCertificateValidationCallback = (_, certificate, chain, errors) => Accept(certificate, chain, errors, TlsFiles.Peer.LaneOutbound),
    };

    private bool Accept(X509Certificate? certificate, X509Chain? chain, SslPolicyErrors errors, TlsFiles.Peer peer)
    {
        if (certificate is null)
        {
            _rejected?.Invoke($"no certificate ({peer.What})");
            return false;
        }
        return _files.Accept(certificate as X509Certificate2 ?? new X509Certificate2(certificate), chain, errors, peer, _rejected);
    }
}
