using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;
using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;
using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// TLS with mutual authentication between real processes: two silos started by `cluster.sh start --tls` (development
/// certificates from make-dev-certs.sh), a CLI let in with the client certificate, and CLIs refused without one or
/// with one from another CA; a cluster on distinct addresses that checks a peer name instead of addresses; extended key
/// usages (a client certificate refused on the silo port, a gateway certificate without serverAuth refused by the CLI).
/// Also the one-line start errors of silo and CLI for missing files, mismatched keys and unfit certificates.
/// </summary>
[Collection("cluster")]
public sealed class TlsClusterTests() : ClusterWorkspace("e2e-tls-")
{
    [Fact]
    public async Task A_tls_cluster_trains_with_the_client_certificate_and_refuses_clients_without_one_or_from_another_ca()
    {
        var data = SyntheticDigits.Create(trainCount: 320, testCount: 100, seed: 5);
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), data);
        var taken = new HashSet<int>();
        int siloPort = FreePorts(2, taken), gatewayPort = FreePorts(2, taken);
        string cluster = "e2e-" + Guid.NewGuid().ToString("N")[..8];

        var started = Script(State, "start", "--silos", "2", "--tls", "--silo-port", siloPort.ToString(), "--gateway-port", gatewayPort.ToString(),
            "--cluster-id", cluster, "--data-dir", DataDir);
        Assert.True(started.Code == 0, started.Output);
        Assert.Contains("silo-1 up", started.Output);
        // silo-1 joined silo-0 over TLS: membership traffic is silo-to-silo.
        Assert.Contains("TLS: certificate 'CN=backprop silo'", File.ReadAllText(Path.Combine(State, "silo-1.log")));

        // cluster.env names what the CLI needs, as the environment variables the CLI reads.
        var tlsEnv = ClusterTlsEnv();
        Assert.Equal(["BACKPROP_TLS_CA", "BACKPROP_TLS_CERT", "BACKPROP_TLS_KEY"], tlsEnv.Keys.Order());
        string certs = Path.Combine(State, "certs");
        Assert.Equal(Path.Combine(certs, "client.pem"), tlsEnv["BACKPROP_TLS_CERT"]);

        string gateways = $"127.0.0.1:{gatewayPort},127.0.0.1:{gatewayPort + 1}";
        TrainsLikeLocalTrainer(tlsEnv, gateways, cluster, "tls-run", data);

        // The same files as flags; the workers were spread over both silos, so silo-to-silo calls went over TLS too.
        string[] clientFlags = ["--tls-cert", Path.Combine(certs, "client.pem"), "--tls-key", Path.Combine(certs, "client.key"), "--tls-ca", Path.Combine(certs, "ca.pem")];
        var status = Cli(["status", "tls-run", "--gateway", gateways, "--cluster-id", cluster, .. clientFlags]);
        Assert.True(status.Code == 0, status.Output);
        Assert.Contains("run tls-run: completed", status.Output);
        Assert.Contains("workers on 2 silo(s)", status.Output);
        // The silos' data lanes carried the pushes and pulls between them, over TLS (a lane is dialled once a shard's
        // reply names it: the workers on both silos had shards on the other).
        var laneLogs = new[] { "silo-0.log", "silo-1.log" }.Select(log => File.ReadAllText(Path.Combine(State, log))).ToArray();
        Assert.All(laneLogs, text => Assert.Contains("Data lane listening on 127.0.0.1:", text));
        Assert.All(laneLogs, text => Assert.Matches(@"Data lane: connected to 127\.0\.0\.1:\d+ \(TLS\)", text));
        Assert.All(laneLogs, text => Assert.DoesNotContain("TLS: refused a peer", text));

        // Another development CA, with its own client certificate.
        string other = Path.Combine(Work, "other-ca");
        var made = Run("bash", [Path.Combine(Root, "deploy/local/make-dev-certs.sh"), other]);
        Assert.True(made.Code == 0, made.Output);

        string[] target = ["status", "tls-run", "--gateway", $"127.0.0.1:{gatewayPort}", "--cluster-id", cluster];
        var refusals = new Dictionary<string, string[]>
        {
            ["no TLS"] = [.. target],
            ["TLS without a client certificate"] = [.. target, "--tls-ca", Path.Combine(certs, "ca.pem")],
            // The silo judges the certificate: the client trusts the cluster's CA but presents another CA's certificate.
            ["a client certificate of another CA"] = [.. target, "--tls-cert", Path.Combine(other, "client.pem"), "--tls-key", Path.Combine(other, "client.key"),
                "--tls-ca", Path.Combine(certs, "ca.pem")],
            // The client judges the gateway: it trusts only the other CA.
            ["another CA altogether"] = [.. target, "--tls-cert", Path.Combine(other, "client.pem"), "--tls-key", Path.Combine(other, "client.key"),
                "--tls-ca", Path.Combine(other, "ca.pem")],
        };
        // In parallel: a refused client retries until its connect limit.
        var runs = refusals.Select(r => Task.Run(() => (What: r.Key, Result: Cli(r.Value)))).ToArray();
        var results = (await Task.WhenAll(runs)).ToDictionary(r => r.What, r => r.Result);
        foreach (var (what, refused) in results)
        {
            Assert.True(refused.Code == 1, $"{what}: {refused.Output}");
            var error = Assert.Single(refused.Error.Trim().Split('\n'));
            Assert.StartsWith($"error: cannot reach a cluster '{cluster}' at gateway 127.0.0.1:{gatewayPort}", error);
            Assert.Contains("(TLS: ", error);
            // Nothing else: no log line of Orleans on either stream.
            Assert.Equal("", refused.Output.Replace(refused.Error, "").Trim());
        }
        Assert.Contains("this client refused the gateway's certificate", results["another CA altogether"].Error);
        Assert.Contains("requires a client certificate", results["TLS without a client certificate"].Error);
        // The silo says whose certificate it refused and why (Orleans only logs that a handshake failed).
        Assert.Contains("TLS: refused a peer: 'CN=backprop client'", File.ReadAllText(Path.Combine(State, "silo-0.log")));

        // The data lane is as strict as the silo port: from a silo's address (127.0.0.1), neither a plaintext dialler, a
        // client's certificate nor a silo certificate of another CA is greeted; the lane names each refused certificate.
        string silo1Log = Path.Combine(State, "silo-1.log");
        int lanePort = int.Parse(System.Text.RegularExpressions.Regex.Match(File.ReadAllText(silo1Log), @"Data lane listening on 127\.0\.0\.1:(\d+)").Groups[1].Value);
        Assert.False(await LaneGreets(lanePort, null), "a plaintext dialler was greeted");
        Assert.False(await LaneGreets(lanePort, (Path.Combine(certs, "client.pem"), Path.Combine(certs, "client.key"))), "a client certificate was greeted");
        Assert.False(await LaneGreets(lanePort, (Path.Combine(other, "silo.pem"), Path.Combine(other, "silo.key"))), "another CA's silo certificate was greeted");
        // And the cluster's own silo certificate is, so the refusals above are the certificates' doing.
        Assert.True(await LaneGreets(lanePort, (Path.Combine(certs, "silo.pem"), Path.Combine(certs, "silo.key"))), "the cluster's silo certificate was not greeted");
        await LogContains(silo1Log, "(connected to the data lane, where only silos may");
        await LogContains(silo1Log, "ended before it was served");   // the plaintext dialler, named
    }

    /// <summary>
    /// Whether a silo's data lane at 127.0.0.1:<paramref name="port"/> greets a dialler that presents <paramref name="certificate"/>
    /// over TLS (trusting any server certificate: the lane's checks are what is tested), or that speaks plaintext when null.
    /// </summary>
    private static async Task<bool> LaneGreets(int port, (string Pem, string Key)? certificate)
    {
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(IPAddress.Loopback, port);
        Stream stream = new NetworkStream(socket, ownsSocket: false);
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        try
        {
            if (certificate is { } c)
            {
                var ssl = new SslStream(stream, leaveInnerStreamOpen: false);
                stream = ssl;
                using var own = X509Certificate2.CreateFromPemFile(c.Pem, c.Key);
                await ssl.AuthenticateAsClientAsync(new SslClientAuthenticationOptions
                {
                    TargetHost = "127.0.0.1",
                    ClientCertificates = [X509CertificateLoader.LoadPkcs12(own.Export(X509ContentType.Pkcs12), null)],
                    RemoteCertificateValidationCallback = (_, _, _, _) => true,
                }, timeout.Token);
            }
            else
            {
                await stream.WriteAsync("hello, plaintext\n"u8.ToArray(), timeout.Token);
            }
            var greeting = new byte[1];
            return await stream.ReadAsync(greeting, timeout.Token) == 1 && greeting[0] == 0x42;
        }
        catch (Exception e) when (e is AuthenticationException or IOException or SocketException)
        {
            return false;
        }
        finally
        {
            stream.Dispose();
        }
    }

    [Fact]
    public async Task With_a_peer_name_silos_on_addresses_their_certificates_do_not_name_train_and_a_client_certificate_is_refused_on_the_silo_port()
    {
        var data = SyntheticDigits.Create(trainCount: 320, testCount: 100, seed: 5);
        IdxWriter.WriteDataset(DatasetCatalog.DirectoryOf(DataDir, "mnist"), data);
        // Certificates that name 127.0.0.1 and backprop-silo only: the silos bind 127.0.0.2 and 127.0.0.3, as pods
        // get addresses no certificate can know. cluster.sh keeps certificates already in its state folder.
        string certs = Path.Combine(State, "certs");
        var made = Run("bash", [Path.Combine(Root, "deploy/local/make-dev-certs.sh"), certs], new() { ["BACKPROP_CERT_HOSTS"] = "1" });
        Assert.True(made.Code == 0, made.Output);
        var taken = new HashSet<int>();
        int siloPort = FreePorts(1, taken), gatewayPort = FreePorts(1, taken);
        string cluster = "e2e-" + Guid.NewGuid().ToString("N")[..8];

        var started = Script(State, "start", "--silos", "2", "--distinct-addresses", "--tls-peer-name", "backprop-silo",
            "--silo-port", siloPort.ToString(), "--gateway-port", gatewayPort.ToString(), "--cluster-id", cluster, "--data-dir", DataDir);
        Assert.True(started.Code == 0, started.Output);
        // silo-1 (127.0.0.3) joined silo-0 (127.0.0.2) over TLS, checking the name: no certificate names those addresses.
        Assert.Contains("silos must carry the name backprop-silo", File.ReadAllText(Path.Combine(State, "silo-1.log")));
        var clusterEnv = ClusterTlsEnv();
        Assert.Equal("backprop-silo", clusterEnv["BACKPROP_TLS_PEER_NAME"]);

        string gateways = $"127.0.0.2:{gatewayPort},127.0.0.3:{gatewayPort}";
        TrainsLikeLocalTrainer(clusterEnv, gateways, cluster, "peer-name-run", data);

        // A CLI that expects another name, or (no peer name) the address it dials, refuses the gateway's certificate.
        string[] client = ["status", "peer-name-run", "--gateway", $"127.0.0.2:{gatewayPort}", "--cluster-id", cluster,
            "--tls-cert", Path.Combine(certs, "client.pem"), "--tls-key", Path.Combine(certs, "client.key"), "--tls-ca", Path.Combine(certs, "ca.pem")];
        var refusals = new Dictionary<string, (string[] Args, string Why)>
        {
            ["another name"] = ([.. client, "--tls-peer-name", "other-name"], "'CN=backprop silo' does not carry the name other-name in its subject alternative names"),
            ["the address"] = (client, "'CN=backprop silo' does not name the address it was reached at"),
        };
        foreach (var (what, (args, why)) in refusals)
        {
            var refused = Cli(args);
            Assert.True(refused.Code == 1, $"{what}: {refused.Output}");
            var error = Assert.Single(refused.Error.Trim().Split('\n'));
            Assert.StartsWith($"error: cannot reach a cluster '{cluster}' at gateway 127.0.0.2:{gatewayPort}: this client refused the gateway's certificate (TLS: {why}", error);
            Assert.Equal("", refused.Output.Replace(refused.Error, "").Trim());
        }

        // The client certificate is of the cluster's CA and let in on the gateway port (the run above), but it is no
        // silo's: presented on the silo port, it is refused.
        using var clientCertificate = LoadPem(Path.Combine(certs, "client.pem"), Path.Combine(certs, "client.key"));
        Assert.False(await TlsAccepted(new IPEndPoint(IPAddress.Parse("127.0.0.2"), siloPort), clientCertificate));
        await LogContains(Path.Combine(State, "silo-0.log"),
            "TLS: refused a peer: 'CN=backprop client' lacks the extended key usage serverAuth (connected to the silo port, where only silos may;");
    }

    [Fact]
    public async Task The_cli_refuses_a_gateway_whose_certificate_lacks_server_authentication()
    {
        string certs = Path.Combine(Work, "certs");
        Assert.Equal(0, Run("bash", [Path.Combine(Root, "deploy/local/make-dev-certs.sh"), certs]).Code);
        // A TLS server on loopback that presents a certificate of the cluster's CA made for clients only.
        using var gatewayCertificate = LoadPem(Path.Combine(certs, "client.pem"), Path.Combine(certs, "client.key"));
        var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        using var stop = new CancellationTokenSource();
        var serving = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                TcpClient connection;
                try { connection = await listener.AcceptTcpClientAsync(stop.Token); }
                catch (OperationCanceledException) { return; }
                using (connection)
                await using (var ssl = new SslStream(connection.GetStream()))
                {
                    try { await ssl.AuthenticateAsServerAsync(new SslServerAuthenticationOptions { ServerCertificate = gatewayCertificate }, stop.Token); }
                    catch (Exception e) when (e is IOException or AuthenticationException or OperationCanceledException) { /* the CLI hung up */ }
                }
            }
        });
        try
        {
            int port = ((IPEndPoint)listener.LocalEndpoint).Port;
            var refused = Cli("status", "some-run", "--gateway", $"127.0.0.1:{port}", "--tls-cert", Path.Combine(certs, "client.pem"),
                "--tls-key", Path.Combine(certs, "client.key"), "--tls-ca", Path.Combine(certs, "ca.pem"));
            Assert.True(refused.Code == 1, refused.Output);
            var error = Assert.Single(refused.Error.Trim().Split('\n'));
            Assert.Contains("this client refused the gateway's certificate (TLS: 'CN=backprop client' lacks the extended key usage serverAuth (the gateway this client dialled;", error);
        }
        finally
        {
            stop.Cancel();
            listener.Stop();
            await serving;
        }
    }

    /// <summary>A PEM certificate with its key, usable by SslStream.</summary>
    /// <summary>The TLS settings cluster.sh wrote for the CLI, as the environment variables the CLI reads.</summary>
    private Dictionary<string, string> ClusterTlsEnv() => File.ReadAllLines(Path.Combine(State, "cluster.env"))
        .Where(l => l.StartsWith("BACKPROP_TLS_", StringComparison.Ordinal))
        .Select(l => l.Split('=', 2)).ToDictionary(p => p[0], p => p[1]);

    /// <summary>One epoch over TLS with 2 workers; the parameters must be those of a single process.</summary>
    private void TrainsLikeLocalTrainer(Dictionary<string, string> env, string gateways, string cluster, string runId, TrainTest data)
    {
        string metrics = Path.Combine(Work, $"{runId}.jsonl");
        var train = CliWithEnv(env, "train", "--preset", "pytorch-mlp", "--epochs", "1", "--workers", "2", "--seed", "6",
            "--gateway", gateways, "--cluster-id", cluster, "--run-id", runId, "--metrics-out", metrics);
        Assert.True(train.Code == 0, train.Output);
        var line = JsonDocument.Parse(File.ReadAllLines(metrics).Single()).RootElement;
        using var local = new LocalTrainer(Presets.PyTorchMlp with { Seed = 6, Workers = 2, Epochs = 1 }, data.Train);
        local.TrainEpoch(0);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), line.GetProperty("parameterSha256").GetString());
    }

    private static X509Certificate2 LoadPem(string cert, string key)
    {
        using var pem = X509Certificate2.CreateFromPemFile(cert, key);
        return X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
    }

    /// <summary>
    /// Whether a silo port keeps a TLS connection that presents <paramref name="certificate"/> open: a refusal
    /// fails the handshake (TLS 1.2) or closes the connection right after it (TLS 1.3, where the server judges the
    /// client's certificate after the client has finished). An accepted connection waits for Orleans' preamble,
    /// so nothing is read from it before the safety-net limit.
    /// </summary>
    private static async Task<bool> TlsAccepted(IPEndPoint endpoint, X509Certificate2 certificate)
    {
        using var tcp = new TcpClient();
        await tcp.ConnectAsync(endpoint);
        await using var ssl = new SslStream(tcp.GetStream(), false, (_, _, _, _) => true);
        using var limit = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        try
        {
            await ssl.AuthenticateAsClientAsync(new SslClientAuthenticationOptions
            {
                TargetHost = "backprop-silo",
                ClientCertificates = [certificate],
            }, limit.Token);
            return await ssl.ReadAsync(new byte[1], limit.Token) > 0;
        }
        catch (Exception e) when (e is IOException or AuthenticationException)
        {
            return false;
        }
        catch (OperationCanceledException)
        {
            return true;
        }
    }

    /// <summary>Waits until <paramref name="log"/> holds <paramref name="text"/> (the silo's console is buffered); fails after a minute.</summary>
    private static async Task LogContains(string log, string text)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (!File.ReadAllText(log).Contains(text, StringComparison.Ordinal))
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"{log} does not say: {text}");
            await Task.Delay(100);   // polls the file; the wait bounds the polling rate
        }
    }

    [Fact]
    public void Missing_files_and_a_key_of_another_certificate_are_one_line_errors_of_silo_and_cli()
    {
        string certs = Path.Combine(Work, "certs");
        var made = Run("bash", [Path.Combine(Root, "deploy/local/make-dev-certs.sh"), certs]);
        Assert.True(made.Code == 0, made.Output);
        string ca = Path.Combine(certs, "ca.pem"), silo = Path.Combine(certs, "silo.pem"), missing = Path.Combine(certs, "missing.pem");

        var cases = new (string[] Args, string Expected)[]
        {
            (["--tls-cert", missing, "--tls-key", Path.Combine(certs, "silo.key"), "--tls-ca", ca], $"error: --tls-cert: {missing}: no such file"),
            (["--tls-cert", silo, "--tls-key", Path.Combine(certs, "client.key"), "--tls-ca", ca],
                $"error: --tls-key: {Path.Combine(certs, "client.key")} is not the private key of the certificate in {silo}"),
            (["--tls-cert", silo, "--tls-key", Path.Combine(certs, "silo.key"), "--tls-ca", missing], $"error: --tls-ca: {missing}: no such file"),
            (["--tls-cert", silo, "--tls-key", Path.Combine(certs, "silo.key")], "error: --tls-ca: needed with --tls-cert/--tls-key"),
        };
        foreach (var (args, expected) in cases)
        {
            var siloRun = SiloHost(["--silo-port", "1", "--gateway-port", "1", .. args]);
            Assert.True(siloRun.Code == 2, siloRun.Output);
            Assert.StartsWith(expected, Assert.Single(siloRun.Output.Trim().Split('\n')));

            var cli = Cli(["status", "some-run", "--gateway", "127.0.0.1:1", .. args]);
            Assert.True(cli.Code == 2, cli.Output);
            Assert.StartsWith(expected, Assert.Single(cli.Output.Trim().Split('\n')));
        }

        // A silo's own certificate must come from the CA it trusts (its peers would refuse it).
        string other = Path.Combine(Work, "other-ca");
        Assert.Equal(0, Run("bash", [Path.Combine(Root, "deploy/local/make-dev-certs.sh"), other]).Code);
        var foreign = SiloHost("--tls-cert", silo, "--tls-key", Path.Combine(certs, "silo.key"), "--tls-ca", Path.Combine(other, "ca.pem"));
        Assert.Equal(2, foreign.Code);
        Assert.StartsWith($"error: --tls-cert: {silo} is not accepted by the CA in {Path.Combine(other, "ca.pem")}", Assert.Single(foreign.Output.Trim().Split('\n')));

        // A silo's certificate must be fit for both ends of a silo connection, and carry the peer name its peers check.
        string client = Path.Combine(certs, "client.pem");
        var clientAsSilo = SiloHost("--tls-cert", client, "--tls-key", Path.Combine(certs, "client.key"), "--tls-ca", ca);
        Assert.Equal(2, clientAsSilo.Code);
        Assert.Equal($"error: --tls-cert: {client}: 'CN=backprop client' lacks the extended key usage serverAuth (a silo's certificate needs serverAuth and clientAuth)",
            Assert.Single(clientAsSilo.Output.Trim().Split('\n')));
        var otherName = SiloHost("--tls-cert", silo, "--tls-key", Path.Combine(certs, "silo.key"), "--tls-ca", ca, "--tls-peer-name", "other-name");
        Assert.Equal(2, otherName.Code);
        Assert.StartsWith($"error: --tls-cert: {silo} does not carry --tls-peer-name other-name in its subject alternative names",
            Assert.Single(otherName.Output.Trim().Split('\n')));
        var notAName = Cli("status", "some-run", "--gateway", "127.0.0.1:1", "--tls-ca", ca, "--tls-peer-name", "not a name");
        Assert.Equal(2, notAName.Code);
        Assert.Equal("error: --tls-peer-name: 'not a name' is not a DNS name", Assert.Single(notAName.Output.Trim().Split('\n')));
    }
}
