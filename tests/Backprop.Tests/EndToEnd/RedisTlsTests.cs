using System.Net;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// TLS to Redis for real: Debian's redis-server on a TLS port only (with AUTH), a certificate made here by a CA made
/// here; a silo with --redis-tls --redis-ca joins and a client trains through it, both trusting that CA alone. A silo
/// or client given another CA refuses Redis' certificate at once, in one line.
/// </summary>
[Collection("cluster")]
public sealed class RedisTlsTests : IDisposable
{
    private readonly string _work = Directory.CreateTempSubdirectory("redis-tls-").FullName;

    public void Dispose() => Directory.Delete(_work, recursive: true);

    [Fact]
    public void A_cluster_uses_redis_over_tls_trusting_only_the_given_ca()
    {
        var data = SyntheticDigits.Create(trainCount: 320, testCount: 100, seed: 9);
        string dataDir = Path.Combine(_work, "data");
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(dataDir, "mnist"), data);
        string ca = Path.Combine(_work, "ca.pem"), otherCa = Path.Combine(_work, "other-ca.pem");
        string cert = Path.Combine(_work, "redis.pem"), key = Path.Combine(_work, "redis.key");
        using (var authority = MakeCa("CN=backprop test redis CA", ca))
            MakeServerCertificate(authority, cert, key);
        MakeCa("CN=another CA", otherCa).Dispose();
        string passwordFile = Path.Combine(_work, "redis.password"), password = Guid.NewGuid().ToString("N");
        File.WriteAllText(passwordFile, password + "\n");

        var taken = new HashSet<int>();
        int tlsPort = Processes.FreePorts(1, taken);
        string cluster = "tls-" + Guid.NewGuid().ToString("N")[..8];
        // No plain port at all; clients need no certificate of their own (AUTH identifies them).
        using var redis = LoggedProcess.Redis(Path.Combine(_work, "redis"), ["--bind", "127.0.0.1", "--port", "0", "--tls-port", tlsPort.ToString(),
            "--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no", "--requirepass", password]);

        string[] siloArgs = ["--redis", $"localhost:{tlsPort}", "--redis-tls", "--redis-password-file", passwordFile, "--cluster-id", cluster, "--data-dir", dataDir,
            "--silo-port", Processes.FreePorts(1, taken).ToString(), "--gateway-port", Processes.FreePorts(1, taken).ToString()];
        // Another CA: refused at once (no waiting for a Redis that answered), in one line naming the CA file.
        using (var refused = LoggedProcess.Silo([.. siloArgs, "--redis-ca", otherCa]))
        {
            var result = refused.Finish(TimeSpan.FromSeconds(90));
            Assert.Equal(1, result.Code);
            Assert.DoesNotContain("waiting for Redis", result.Output);
            var error = Assert.Single(result.Output.Split('\n'), l => l.StartsWith("error:", StringComparison.Ordinal));
            Assert.StartsWith($"error: cannot connect to Redis localhost:{tlsPort} (password from {passwordFile}, TLS, CA {otherCa}): Redis' certificate is not signed by the CA in {otherCa}", error);
        }

        using var silo = LoggedProcess.Silo([.. siloArgs, "--redis-ca", ca]);
        silo.WaitForLine(l => l.Contains(" up: role all"), TimeSpan.FromSeconds(90));
        Assert.Contains($"Redis: TLS, CA {ca}", silo.WaitForLine(l => l.Contains("Redis: TLS"), TimeSpan.FromSeconds(30)));

        string metrics = Path.Combine(_work, "metrics.jsonl");
        string[] client = ["--redis", $"127.0.0.1:{tlsPort}", "--redis-tls", "--redis-password-file", passwordFile, "--cluster-id", cluster];
        var trained = Processes.Cli(["train", "--preset", "pytorch-mlp", "--epochs", "1", "--workers", "1", "--seed", "5", "--run-id", "tls-redis-run",
            "--metrics-out", metrics, .. client, "--redis-ca", ca]);
        Assert.True(trained.Code == 0, trained.Output);
        var local = new LocalTrainer(Presets.PyTorchMlp with { Seed = 5, Workers = 1, Epochs = 1 }, data.Train);
        local.TrainEpoch(0);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), JsonDocument.Parse(File.ReadAllLines(metrics).Single()).RootElement.GetProperty("parameterSha256").GetString());

        // The client trusts only its CA too; waiting would not change a certificate, so it does not wait.
        var wrongCa = Processes.Cli(["status", "tls-redis-run", .. client, "--redis-ca", otherCa, "--connect-timeout", "600"]);
        Assert.Equal(1, wrongCa.Code);
        Assert.StartsWith($"error: cannot reach a cluster '{cluster}' through Redis 127.0.0.1:{tlsPort}: Redis' certificate is not signed by the CA in {otherCa}",
            Assert.Single(wrongCa.Error.Trim().Split('\n')));
        // Without the CA, the system's roots do not know this one.
        var systemRoots = Processes.Cli(["status", "tls-redis-run", .. client]);
        Assert.Equal(1, systemRoots.Code);
        Assert.Contains("Redis' certificate 'CN=redis' is not trusted by this system", Assert.Single(systemRoots.Error.Trim().Split('\n')));

        silo.Terminate();
        Assert.Equal(0, silo.Finish(TimeSpan.FromSeconds(90)).Code);
        Assert.DoesNotContain(password, silo.Output);
    }

    [Fact]
    public void Redis_ca_without_redis_tls_and_a_missing_ca_file_are_one_line_errors()
    {
        var withoutTls = Processes.SiloHost("--redis", "localhost:6379", "--redis-ca", Path.Combine(_work, "ca.pem"));
        Assert.Equal(2, withoutTls.Code);
        Assert.Equal("error: --redis-ca: given without --redis-tls", Assert.Single(withoutTls.Output.Trim().Split('\n')));

        var missing = Processes.Cli("runs", "--redis", "localhost:6379", "--redis-tls", "--redis-ca", Path.Combine(_work, "none.pem"));
        Assert.Equal(2, missing.Code);
        Assert.Equal($"error: --redis-ca: {Path.Combine(_work, "none.pem")}: no such file", Assert.Single(missing.Error.Trim().Split('\n')));
    }

    /// <summary>A self-signed CA, written as PEM to <paramref name="path"/>; with its private key, to sign with.</summary>
    private static X509Certificate2 MakeCa(string subject, string path)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest(subject, key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
        request.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(request.PublicKey, false));
        var ca = request.CreateSelfSigned(DateTimeOffset.UtcNow.AddMinutes(-5), DateTimeOffset.UtcNow.AddDays(1));
        File.WriteAllText(path, ca.ExportCertificatePem() + "\n");
        return ca;
    }

    /// <summary>Redis' certificate, signed by <paramref name="ca"/>, naming localhost and 127.0.0.1.</summary>
    private static void MakeServerCertificate(X509Certificate2 ca, string certPath, string keyPath)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest("CN=redis", key, HashAlgorithmName.SHA256);
        var names = new SubjectAlternativeNameBuilder();
        names.AddDnsName("localhost");
        names.AddIpAddress(IPAddress.Loopback);
        request.CertificateExtensions.Add(names.Build());
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid("1.3.6.1.5.5.7.3.1")], false));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature, true));
        request.CertificateExtensions.Add(X509AuthorityKeyIdentifierExtension.CreateFromCertificate(ca, true, false));
        using var certificate = request.Create(ca, DateTimeOffset.UtcNow.AddMinutes(-5), DateTimeOffset.UtcNow.AddDays(1), RandomNumberGenerator.GetBytes(16));
        File.WriteAllText(certPath, certificate.ExportCertificatePem() + "\n");
        File.WriteAllText(keyPath, key.ExportPkcs8PrivateKeyPem() + "\n");
    }
}
