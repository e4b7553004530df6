using System.Text.Json;
using Backprop.Core;
using Backprop.Core.Data;
using Backprop.Core.Training;
using static Backprop.Tests.EndToEnd.Processes;

namespace Backprop.Tests.EndToEnd;

/// <summary>
/// TLS with mutual authentication between real processes: two silos started by `cluster.sh start --tls` (development
/// certificates from make-dev-certs.sh), a CLI let in with the client certificate, and CLIs refused without one or
/// with one from another CA. Also the one-line start errors of silo and CLI for missing files and mismatched keys.
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
        var tlsEnv = File.ReadAllLines(Path.Combine(State, "cluster.env"))
            .Where(l => l.StartsWith("BACKPROP_TLS_", StringComparison.Ordinal))
            .Select(l => l.Split('=', 2)).ToDictionary(p => p[0], p => p[1]);
        Assert.Equal(["BACKPROP_TLS_CA", "BACKPROP_TLS_CERT", "BACKPROP_TLS_KEY"], tlsEnv.Keys.Order());
        string certs = Path.Combine(State, "certs");
        Assert.Equal(Path.Combine(certs, "client.pem"), tlsEnv["BACKPROP_TLS_CERT"]);

        string gateways = $"127.0.0.1:{gatewayPort},127.0.0.1:{gatewayPort + 1}";
        string metrics = Path.Combine(Work, "metrics.jsonl");
        var train = CliWithEnv(tlsEnv, "train", "--preset", "pytorch-mlp", "--epochs", "1", "--workers", "2", "--seed", "6",
            "--gateway", gateways, "--cluster-id", cluster, "--run-id", "tls-run", "--metrics-out", metrics);
        Assert.True(train.Code == 0, train.Output);
        var line = JsonDocument.Parse(File.ReadAllLines(metrics).Single()).RootElement;
        var local = new LocalTrainer(Presets.PyTorchMlp with { Seed = 6, Workers = 2, Epochs = 1 }, data.Train);
        local.TrainEpoch(0);
        Assert.Equal(ParameterHash.Sha256(local.Parameters), line.GetProperty("parameterSha256").GetString());

        // The same files as flags; the workers were spread over both silos, so silo-to-silo calls went over TLS too.
        string[] clientFlags = ["--tls-cert", Path.Combine(certs, "client.pem"), "--tls-key", Path.Combine(certs, "client.key"), "--tls-ca", Path.Combine(certs, "ca.pem")];
        var status = Cli(["status", "tls-run", "--gateway", gateways, "--cluster-id", cluster, .. clientFlags]);
        Assert.True(status.Code == 0, status.Output);
        Assert.Contains("run tls-run: completed", status.Output);
        Assert.Contains("workers on 2 silo(s)", status.Output);

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
    }
}
