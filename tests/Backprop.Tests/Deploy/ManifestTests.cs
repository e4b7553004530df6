using System.ComponentModel;
using System.Diagnostics;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Backprop.Grains.Hosting;
using Backprop.Tests.EndToEnd;
using YamlDotNet.RepresentationModel;

namespace Backprop.Tests.Deploy;

/// <summary>
/// The deploy manifests as the tools render them: <c>kubectl kustomize</c> for deploy/k8s and its overlays,
/// <c>docker-compose config</c> for deploy/compose, and the offline schema check deploy/k8s/validate.mjs.
/// Needs kubectl, docker-compose, node and <c>npm ci</c> in deploy/k8s (.ci/run installs them); a missing
/// tool fails with its name. Nothing here talks to a cluster or a container engine.
/// </summary>
public sealed class ManifestTests
{
    private static readonly string K8s = Path.Combine(Processes.Root, "deploy/k8s");
    private static readonly string ComposeFile = Path.Combine(Processes.Root, "deploy/compose/compose.yaml");

    /// <summary>Every folder kubectl kustomize must render: the base and each overlay.</summary>
    private static IEnumerable<string> Kustomizations() =>
        new[] { K8s }.Concat(Directory.GetDirectories(Path.Combine(K8s, "overlays")).Order());

    [Fact]
    public void Every_kustomization_renders_and_its_objects_pass_the_api_schema()
    {
        Assert.True(Directory.Exists(Path.Combine(K8s, "node_modules")),
            "deploy/k8s/node_modules is missing: run `npm ci` in deploy/k8s (.ci/run does)");
        foreach (var dir in Kustomizations())
        {
            var yaml = Render(dir);
            var check = Tool("node", [Path.Combine(K8s, "validate.mjs")], stdin: yaml);
            Assert.True(check.Code == 0, $"{Path.GetRelativePath(Processes.Root, dir)}: {check.Output}");
            Assert.Contains(" valid, 0 invalid", check.Output);
        }
    }

    [Fact]
    public void Selectors_match_the_pod_labels_and_services_reach_named_ports()
    {
        foreach (var dir in Kustomizations())
        {
            var objects = Objects(Render(dir));
            var workloads = objects.Where(o => Kind(o) is "Deployment" or "StatefulSet" or "Job").ToList();
            foreach (var w in workloads.Where(w => Kind(w) != "Job"))
            {
                var selector = Map(w["spec"]!["selector"]!["matchLabels"]);
                var labels = Map(w["spec"]!["template"]!["metadata"]!["labels"]);
                Assert.NotEmpty(selector);
                Assert.All(selector, kv => Assert.True(labels.GetValueOrDefault(kv.Key) == kv.Value,
                    $"{Id(w)}: selector {kv.Key}={kv.Value} is not on its pods ({Show(labels)})"));
                // Orleans' Kubernetes hosting rewrites these labels on the pod: in a selector that would orphan it.
                Assert.DoesNotContain(selector.Keys, k => k.StartsWith("orleans/", StringComparison.Ordinal));
            }
            foreach (var service in objects.Where(o => Kind(o) == "Service"))
            {
                var selector = Map(service["spec"]!["selector"]);
                var pods = workloads.Where(w => Kind(w) != "Job" && selector.All(kv =>
                    Map(w["spec"]!["template"]!["metadata"]!["labels"]).GetValueOrDefault(kv.Key) == kv.Value)).ToList();
                Assert.True(selector.Count > 0 && pods.Count > 0, $"{Id(service)}: its selector {Show(selector)} matches no pods");
                foreach (var port in service["spec"]!["ports"]!.AsArray())
                {
                    string target = Str(port!["targetPort"]) ?? Str(port["port"])!;
                    Assert.All(pods, p => Assert.True(ContainerPort(p, target) is not null,
                        $"{Id(service)}: targetPort {target} is not a port of {Id(p)}"));
                }
            }
            foreach (var set in objects.Where(o => Kind(o) == "StatefulSet"))
            {
                var governing = objects.SingleOrDefault(o => Kind(o) == "Service" && Name(o) == Str(set["spec"]!["serviceName"]));
                Assert.True(governing is not null && Str(governing["spec"]!["clusterIP"]) == "None",
                    $"{Id(set)}: serviceName must name a headless Service");
            }
        }
    }

    [Fact]
    public void Container_ports_and_probes_use_the_silos_configured_ports()
    {
        var objects = Objects(Render(K8s));
        var settings = Map(ConfigMap(objects, "backprop-silo")["data"]);
        int siloPort = int.Parse(settings["BACKPROP_SILO_PORT"]), gatewayPort = int.Parse(settings["BACKPROP_GATEWAY_PORT"]),
            httpPort = int.Parse(settings["BACKPROP_HTTP_PORT"]);
        var silos = SiloDeployments(objects);
        Assert.Equal(["backprop-server", "backprop-worker"], silos.Select(Name).Order());
        foreach (var silo in silos)
        {
            Assert.Equal(siloPort, ContainerPort(silo, "silo"));
            Assert.Equal(gatewayPort, ContainerPort(silo, "gateway"));
            Assert.Equal(httpPort, ContainerPort(silo, "http"));
            var container = Container(silo);
            foreach (var (probe, path) in new[] { ("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz") })
            {
                var get = container[probe]?["httpGet"];
                Assert.True(get is not null, $"{Id(silo)}: no {probe} httpGet");
                Assert.Equal(path, Str(get["path"]));
                Assert.Equal(httpPort, ContainerPort(silo, Str(get["port"])!));
            }
        }
        // The startup probe gives the process minutes to come up (a slow node, a cold runtime) before liveness counts.
        foreach (var silo in silos)
        {
            var startup = Container(silo)["startupProbe"]!;
            int failures = int.Parse(Str(startup["failureThreshold"]) ?? "3"), period = int.Parse(Str(startup["periodSeconds"]) ?? "10");
            Assert.True(failures * period >= 120, $"{Id(silo)}: startupProbe allows {failures * period} s");
        }
        var gateway = objects.Single(o => Kind(o) == "Service" && Name(o) == "backprop-gateway");
        Assert.Equal(gatewayPort, ContainerPort(silos[0], Str(gateway["spec"]!["ports"]![0]!["targetPort"])!));

        // Compose: the same files set the ports; its healthchecks must ask the health port.
        var compose = Compose();
        foreach (var name in new[] { "server", "worker" })
        {
            var service = compose["services"]![name]!;
            Assert.Equal(settings["BACKPROP_HTTP_PORT"], Str(service["environment"]!["BACKPROP_HTTP_PORT"]));
            var test = string.Join(' ', service["healthcheck"]!["test"]!.AsArray().Select(Str));
            Assert.Contains($"127.0.0.1:{httpPort}/readyz", test);
        }
    }

    [Fact]
    public void Silo_pods_know_their_role_address_and_cluster_and_stop_gracefully()
    {
        var objects = Objects(Render(K8s));
        var clusterId = Map(ConfigMap(objects, "backprop-cluster")["data"])["BACKPROP_CLUSTER_ID"];
        foreach (var silo in SiloDeployments(objects))
        {
            var env = Container(silo)["env"]!.AsArray().ToDictionary(e => Str(e!["name"])!, e => e!);
            string role = Map(silo["metadata"]!["labels"])["app.kubernetes.io/component"];
            Assert.Equal(role, Str(env["BACKPROP_ROLE"]["value"]));
            Assert.Equal("true", Str(env["BACKPROP_KUBERNETES"]["value"]));
            Assert.Equal("status.podIP", Str(env["POD_IP"]["valueFrom"]?["fieldRef"]?["fieldPath"]));
            Assert.Equal("metadata.name", Str(env["POD_NAME"]["valueFrom"]?["fieldRef"]?["fieldPath"]));
            Assert.Equal("metadata.namespace", Str(env["POD_NAMESPACE"]["valueFrom"]?["fieldRef"]?["fieldPath"]));
            // The host gives a stopping silo 30 s (HostOptions.ShutdownTimeout); Kubernetes must wait longer.
            Assert.True(int.Parse(Str(silo["spec"]!["template"]!["spec"]!["terminationGracePeriodSeconds"])!) > 30);
            var limits = Container(silo)["resources"]!;
            Assert.NotNull(limits["requests"]?["cpu"]);
            Assert.NotNull(limits["limits"]?["memory"]);
            var labels = Map(silo["spec"]!["template"]!["metadata"]!["labels"]);
            Assert.Equal(clusterId, labels["orleans/clusterId"]);
        }
        var job = objects.Single(o => Kind(o) == "Job");
        var args = Container(job)["args"]!.AsArray().Select(Str).ToList();
        Assert.Equal("train", args[0]);
        Assert.Equal("$(BACKPROP_REDIS)", args[args.IndexOf("--redis") + 1]);
    }

    [Fact]
    public void The_orleans_serviceId_label_is_the_silos_service_id_and_a_valid_label_value()
    {
        // Microsoft.Orleans.Hosting.Kubernetes selects the cluster's pods by orleans/serviceId=<ServiceId> and
        // patches that label onto its own pod at start: a service id that is no valid label value (at most 63
        // of [A-Za-z0-9-_.], alphanumeric at both ends) fails the patch, and the silo's start with it.
        var objects = Objects(Render(K8s));
        var clusterId = Map(ConfigMap(objects, "backprop-cluster")["data"])["BACKPROP_CLUSTER_ID"];
        string serviceId = RedisCluster.ServiceIdOf(clusterId);
        Assert.Matches(new Regex("^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$"), serviceId);
        foreach (var silo in SiloDeployments(objects))
            Assert.Equal(serviceId, Map(silo["spec"]!["template"]!["metadata"]!["labels"])["orleans/serviceId"]);
    }

    [Fact]
    public void The_silos_service_account_may_read_watch_patch_and_delete_pods()
    {
        var objects = Objects(Render(K8s));
        foreach (var silo in SiloDeployments(objects))
        {
            string account = Str(silo["spec"]!["template"]!["spec"]!["serviceAccountName"])!;
            var binding = objects.Single(o => Kind(o) == "RoleBinding"
                && o["subjects"]!.AsArray().Any(s => Str(s!["kind"]) == "ServiceAccount" && Str(s["name"]) == account));
            var role = objects.Single(o => Kind(o) == "Role" && Name(o) == Str(binding["roleRef"]!["name"]));
            var rule = role["rules"]!.AsArray().Single(r => r!["resources"]!.AsArray().Select(Str).Contains("pods"));
            Assert.Equal(["delete", "get", "list", "patch", "watch"], rule!["verbs"]!.AsArray().Select(Str).Order());
            Assert.Contains(objects, o => Kind(o) == "ServiceAccount" && Name(o) == account);
        }
    }

    [Fact]
    public void Every_environment_variable_set_is_one_the_silo_or_the_cli_reads()
    {
        var siloReads = EnvVarsInHelp(Tool("dotnet", [Path.Combine(Processes.Root, "src/Silo/bin", Processes.Configuration,
            "net10.0/Backprop.Silo.dll"), "--help"]));
        var cliReads = EnvVarsInHelp(Processes.Cli("train", "--help"));
        Assert.Contains("BACKPROP_REDIS", cliReads);

        // Where each variable is set, and by which program it is read.
        var silo = new SortedSet<string>(StringComparer.Ordinal);
        var cli = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var dir in Kustomizations())
        {
            var objects = Objects(Render(dir));
            foreach (var w in objects.Where(o => Kind(o) is "Deployment" or "Job"))
                (Kind(w) == "Job" ? cli : silo).UnionWith(EnvOf(w, objects));
        }
        var compose = Compose();
        foreach (var (name, service) in compose["services"]!.AsObject().Where(s => s.Key != "redis"))
        {
            var set = name == "train" ? cli : silo;
            set.UnionWith(service!["environment"]?.AsObject().Select(kv => kv.Key) ?? []);
            // The silo's entrypoint sets its own address (BACKPROP_HOST=$(hostname -i) ...).
            set.UnionWith(Regex.Matches(string.Join(' ', service["entrypoint"]?.AsArray().Select(Str) ?? []), @"\b(BACKPROP_[A-Z0-9_]+)=")
                .Select(m => m.Groups[1].Value));
        }
        // The image's ENV reaches the silo and the CLI alike.
        var dockerfileEnv = Regex.Matches(File.ReadAllText(Path.Combine(Processes.Root, "deploy/docker/Dockerfile")),
            @"^ENV\s+(BACKPROP_[A-Z0-9_]+)=", RegexOptions.Multiline).Select(m => m.Groups[1].Value).ToList();
        silo.UnionWith(dockerfileEnv);
        cli.UnionWith(dockerfileEnv);

        Assert.Contains("BACKPROP_ROLE", silo);
        Assert.Contains("BACKPROP_REDIS", cli);
        var siloMissing = silo.Where(v => !siloReads.Contains(v)).ToList();
        var cliMissing = cli.Where(v => !cliReads.Contains(v)).ToList();
        Assert.True(siloMissing.Count == 0 && cliMissing.Count == 0,
            $"set by the manifests but not in the silo's --help: {string.Join(", ", siloMissing)}; " +
            $"not in the CLI's train --help: {string.Join(", ", cliMissing)}");
    }

    [Fact]
    public void The_tls_overlay_gives_every_silo_and_the_train_job_certificates_from_a_secret_and_the_peer_name()
    {
        var objects = Objects(Render(Path.Combine(K8s, "overlays/tls")));
        var silos = SiloDeployments(objects);
        var job = objects.Single(o => Kind(o) == "Job");
        Assert.Equal(2, silos.Count);
        var peerNames = new HashSet<string>();
        foreach (var workload in silos.Append(job))
        {
            var container = Container(workload);
            var env = container["env"]!.AsArray().ToDictionary(e => Str(e!["name"])!, e => Str(e!["value"]));
            foreach (var file in new[] { "BACKPROP_TLS_CERT", "BACKPROP_TLS_KEY", "BACKPROP_TLS_CA" })
            {
                Assert.True(env.TryGetValue(file, out var path) && path is not null, $"{Id(workload)}: no {file}");
                // The file lies in a mounted Secret.
                var mount = container["volumeMounts"]?.AsArray().SingleOrDefault(m => path!.StartsWith(Str(m!["mountPath"])! + "/", StringComparison.Ordinal));
                Assert.True(mount is not null, $"{Id(workload)}: {file}={path} is in no volumeMount");
                var volume = workload["spec"]!["template"]!["spec"]!["volumes"]!.AsArray().Single(v => Str(v!["name"]) == Str(mount["name"]));
                Assert.False(string.IsNullOrEmpty(Str(volume!["secret"]?["secretName"])), $"{Id(workload)}: volume {Str(mount["name"])} is not a Secret");
            }
            // Pod IPs change: silos and the CLI check a name that every silo certificate carries.
            Assert.True(env.TryGetValue("BACKPROP_TLS_PEER_NAME", out var peerName) && peerName is { Length: > 0 }, $"{Id(workload)}: no BACKPROP_TLS_PEER_NAME");
            peerNames.Add(peerName!);
        }
        Assert.Contains("backprop-tls-client", job["spec"]!["template"]!["spec"]!["volumes"]!.AsArray().Select(v => Str(v!["secret"]?["secretName"])));
        // One name, and the one the development certificates carry.
        string name = Assert.Single(peerNames);
        var script = File.ReadAllText(Path.Combine(Processes.Root, "deploy/local/make-dev-certs.sh"));
        Assert.Equal(name, Regex.Match(script, @"NAME=\$\{BACKPROP_CERT_NAME:-([^}]+)\}").Groups[1].Value);
        // The base has no TLS: the Job is patched by the component only.
        var baseJob = Container(Objects(Render(K8s)).Single(o => Kind(o) == "Job"));
        Assert.DoesNotContain(baseJob["env"]?.AsArray() ?? [], e => Str(e!["name"])!.StartsWith("BACKPROP_TLS_", StringComparison.Ordinal));
    }

    [Fact]
    public void The_worker_overlays_change_only_the_worker_replica_count()
    {
        var baseObjects = Objects(Render(K8s)).ToDictionary(Id, o => o.ToJsonString());
        var overlays = Directory.GetDirectories(Path.Combine(K8s, "overlays"), "workers-*");
        Assert.NotEmpty(overlays);
        foreach (var dir in overlays)
        {
            int workers = int.Parse(Path.GetFileName(dir)["workers-".Length..]);
            var objects = Objects(Render(dir));
            Assert.Equal(baseObjects.Keys.Order(), objects.Select(Id).Order());
            foreach (var o in objects)
            {
                if (Id(o) == "Deployment/backprop-worker")
                {
                    Assert.Equal(workers.ToString(), Str(o["spec"]!["replicas"]));
                    o["spec"]!["replicas"] = JsonNode.Parse(baseObjects[Id(o)])!["spec"]!["replicas"]!.DeepClone();
                }
                Assert.True(baseObjects[Id(o)] == o.ToJsonString(), $"{Path.GetFileName(dir)}: {Id(o)} differs from the base");
            }
        }
    }

    [Fact]
    public void The_compose_file_parses_and_its_worker_service_is_the_one_that_scales()
    {
        var services = Compose()["services"]!.AsObject();
        Assert.Equal(["redis", "server", "train", "worker"], services.Select(s => s.Key).Order());
        Assert.Equal("2", Str(services["worker"]!["deploy"]?["replicas"]));
        foreach (var name in new[] { "server", "redis", "train" }) Assert.Null(services[name]!["deploy"]?["replicas"]);
        // Anything that names one container or takes one host port would stop --scale worker=N.
        Assert.Null(services["worker"]!["container_name"]);
        Assert.Null(services["worker"]!["ports"]);
        Assert.Equal("server", Str(services["server"]!["environment"]!["BACKPROP_ROLE"]));
        Assert.Equal("worker", Str(services["worker"]!["environment"]!["BACKPROP_ROLE"]));
        // train is a one-shot: only with its profile, after the silos report ready.
        Assert.Equal("train", Str(services["train"]!["profiles"]![0]));
        Assert.Equal("train", Str(services["train"]!["command"]![0]));
        foreach (var silo in new[] { "server", "worker" })
            Assert.Equal("service_healthy", Str(services["train"]!["depends_on"]![silo]!["condition"]));
        // Redis keeps its append-only file on a named volume, and requires the password the silos and train are given.
        var redis = services["redis"]!;
        var entrypoint = string.Join(' ', redis["entrypoint"]!.AsArray().Select(Str));
        Assert.Contains("--appendonly yes", entrypoint);
        Assert.Contains("requirepass $REDIS_PASSWORD", entrypoint.Replace("$$", "$"));
        Assert.Equal(ComposePassword, Str(redis["environment"]!["REDIS_PASSWORD"]));
        foreach (var name in new[] { "server", "worker", "train" })
            Assert.Equal(ComposePassword, Str(services[name]!["environment"]!["BACKPROP_REDIS_PASSWORD"]));
        Assert.StartsWith("redis-data:/data", Str(redis["volumes"]![0]));
    }

    [Fact]
    public void Redis_requires_the_password_of_a_secret_that_every_silo_and_the_train_job_read_as_a_file()
    {
        var objects = Objects(Render(K8s));
        var redis = objects.Single(o => Kind(o) == "StatefulSet" && Name(o) == "redis");
        var redisContainer = Container(redis);
        var secretRef = redisContainer["env"]!.AsArray().Single(e => Str(e!["name"]) == "REDIS_PASSWORD")!["valueFrom"]!["secretKeyRef"]!;
        string secret = Str(secretRef["name"])!, key = Str(secretRef["key"])!;
        // The password goes to redis-server as configuration on stdin, not as an argument.
        var command = string.Join(' ', redisContainer["command"]!.AsArray().Select(Str));
        Assert.Contains("redis-server -", command);
        Assert.Contains("requirepass $REDIS_PASSWORD", command);
        Assert.Contains("REDISCLI_AUTH", string.Join(' ', redisContainer["readinessProbe"]!["exec"]!["command"]!.AsArray().Select(Str)));

        var readers = SiloDeployments(objects).Append(objects.Single(o => Kind(o) == "Job")).ToList();
        Assert.Equal(3, readers.Count);
        foreach (var workload in readers)
        {
            var container = Container(workload);
            string? path = container["env"]!.AsArray().SingleOrDefault(e => Str(e!["name"]) == "BACKPROP_REDIS_PASSWORD_FILE")?["value"] is { } v ? Str(v) : null;
            Assert.True(path is not null, $"{Id(workload)}: no BACKPROP_REDIS_PASSWORD_FILE");
            var mount = container["volumeMounts"]!.AsArray().Single(m => path.StartsWith(Str(m!["mountPath"])! + "/", StringComparison.Ordinal))!;
            var volume = workload["spec"]!["template"]!["spec"]!["volumes"]!.AsArray().Single(v => Str(v!["name"]) == Str(mount["name"]))!;
            Assert.Equal(secret, Str(volume["secret"]?["secretName"]));
            // The file is the Secret's key, under the name the variable gives.
            string file = path[(Str(mount["mountPath"])!.Length + 1)..];
            Assert.Contains(volume["secret"]!["items"]!.AsArray(), i => Str(i!["key"]) == key && Str(i["path"]) == file);
        }
    }

    // ---- tools and YAML ----

    private static string Render(string dir)
    {
        var result = Tool("kubectl", ["kustomize", dir]);
        Assert.True(result.Code == 0, $"kubectl kustomize {dir}: {result.Output}");
        return result.Stdout;
    }

    /// <summary>The compose file requires BACKPROP_REDIS_PASSWORD (it refuses to start without); a stand-in for the checks.</summary>
    private const string ComposePassword = "manifest-test-password";

    private static JsonNode Compose()
    {
        var result = Tool("docker-compose", ["-f", ComposeFile, "config"], env: new() { ["BACKPROP_REDIS_PASSWORD"] = ComposePassword });
        Assert.True(result.Code == 0, $"docker-compose config: {result.Output}");
        return Objects(result.Stdout).Single();
    }

    private sealed record ToolResult(int Code, string Stdout, string Output);

    private static ToolResult Tool(string program, string[] args, string? stdin = null, Dictionary<string, string>? env = null)
    {
        var psi = new ProcessStartInfo(program)
        {
            RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = stdin is not null,
            WorkingDirectory = Processes.Root,
        };
        foreach (var a in args) psi.ArgumentList.Add(a);
        foreach (var (k, v) in env ?? []) psi.Environment[k] = v;
        Process process;
        try
        {
            process = Process.Start(psi)!;
        }
        catch (Win32Exception e)
        {
            throw new InvalidOperationException($"{program} is not installed ({e.Message}); .ci/run installs it", e);
        }
        using (process)
        {
            var stdout = process.StandardOutput.ReadToEndAsync();
            var stderr = process.StandardError.ReadToEndAsync();
            if (stdin is not null)
            {
                process.StandardInput.Write(stdin);
                process.StandardInput.Close();
            }
            if (!process.WaitForExit(TimeSpan.FromSeconds(60)))
            {
                process.Kill(entireProcessTree: true);
                throw new TimeoutException($"{program} {string.Join(' ', args)} did not finish");
            }
            return new ToolResult(process.ExitCode, stdout.Result, stdout.Result + stderr.Result);
        }
    }

    private static HashSet<string> EnvVarsInHelp(ToolResult help) => EnvVarsInHelp(help.Code, help.Output);
    private static HashSet<string> EnvVarsInHelp(Processes.Result help) => EnvVarsInHelp(help.Code, help.Output);

    private static HashSet<string> EnvVarsInHelp(int code, string output)
    {
        Assert.True(code == 0, output);
        // The programs document each variable as "[env NAME]" after the option it sets.
        var names = Regex.Matches(output, @"\[env\s+(BACKPROP_[A-Z0-9_]+)\]").Select(m => m.Groups[1].Value).ToHashSet();
        // Orleans' Kubernetes hosting reads the pod's own variables; the silo's --help names them under --kubernetes.
        names.UnionWith(Regex.Matches(output, @"\b(POD_(?:IP|NAME|NAMESPACE))\b").Select(m => m.Groups[1].Value));
        Assert.NotEmpty(names);
        return names;
    }

    /// <summary>Variables a workload's first container gets: its env, and the keys of the ConfigMaps in envFrom.</summary>
    private static IEnumerable<string> EnvOf(JsonNode workload, List<JsonNode> objects)
    {
        var container = Container(workload);
        foreach (var e in container["env"]?.AsArray() ?? []) yield return Str(e!["name"])!;
        foreach (var from in container["envFrom"]?.AsArray() ?? [])
        {
            string map = Str(from!["configMapRef"]!["name"])!;
            foreach (var key in Map(objects.Single(o => Kind(o) == "ConfigMap" && Name(o) == map)["data"]).Keys) yield return key;
        }
    }

    private static List<JsonNode> SiloDeployments(List<JsonNode> objects) =>
        objects.Where(o => Kind(o) == "Deployment" && Map(o["metadata"]!["labels"]).GetValueOrDefault("app.kubernetes.io/name") == "backprop-silo").ToList();

    /// <summary>A generated ConfigMap, by the name before kustomize's hash suffix.</summary>
    private static JsonNode ConfigMap(List<JsonNode> objects, string name) =>
        objects.Single(o => Kind(o) == "ConfigMap" && Regex.IsMatch(Name(o)!, $"^{name}-[a-z0-9]+$"));

    private static JsonNode Container(JsonNode workload) => workload["spec"]!["template"]!["spec"]!["containers"]![0]!;

    /// <summary>The number of a container port given by name or number; null when the pod has no such port.</summary>
    private static int? ContainerPort(JsonNode workload, string nameOrNumber)
    {
        foreach (var p in Container(workload)["ports"]?.AsArray() ?? [])
            if (Str(p!["name"]) == nameOrNumber || Str(p["containerPort"]) == nameOrNumber) return int.Parse(Str(p["containerPort"])!);
        return null;
    }

    private static string? Kind(JsonNode o) => Str(o["kind"]);
    private static string? Name(JsonNode o) => Str(o["metadata"]?["name"]);
    private static string Id(JsonNode o) => $"{Kind(o)}/{Name(o)}";
    private static string? Str(JsonNode? n) => n?.GetValue<string>();
    private static Dictionary<string, string> Map(JsonNode? n) => n?.AsObject().ToDictionary(kv => kv.Key, kv => Str(kv.Value)!) ?? [];
    private static string Show(Dictionary<string, string> map) => string.Join(",", map.Select(kv => $"{kv.Key}={kv.Value}"));

    /// <summary>The documents of a YAML stream as JSON trees; every scalar stays a string (as written).</summary>
    private static List<JsonNode> Objects(string yaml)
    {
        var stream = new YamlStream();
        stream.Load(new StringReader(yaml));
        return [.. stream.Documents.Select(d => ToJson(d.RootNode)!)];
    }

    private static JsonNode? ToJson(YamlNode node) => node switch
    {
        YamlMappingNode map => new JsonObject(map.Children.Select(kv =>
            KeyValuePair.Create(((YamlScalarNode)kv.Key).Value!, ToJson(kv.Value)))),
        YamlSequenceNode seq => new JsonArray([.. seq.Children.Select(ToJson)]),
        YamlScalarNode scalar => scalar.Value is null ? null : JsonValue.Create(scalar.Value),
        _ => throw new InvalidOperationException($"unexpected YAML node {node.NodeType}"),
    };
}
