using System.ComponentModel;
using System.Diagnostics;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Backprop.Core.Data;
using Backprop.Tests.EndToEnd;
using YamlDotNet.RepresentationModel;

namespace Backprop.Tests.Deploy;

/// <summary>
/// The deploy manifests as the tools render them: <c>kubectl kustomize</c> for every kustomization under deploy/k8s,
/// <c>docker-compose config</c> for deploy/compose, and the offline schema check deploy/k8s/validate.mjs; the
/// Dockerfile as text. Needs kubectl, docker-compose, node and <c>npm ci</c> in deploy/k8s (test.sh installs them);
/// a missing tool fails with its name. Nothing here talks to a cluster or a container engine.
/// </summary>
public sealed class ManifestTests
{
    private static readonly string K8s = Path.Combine(Processes.Root, "deploy/k8s");
    private static readonly string ComposeFile = Path.Combine(Processes.Root, "deploy/compose/compose.yaml");
    private static readonly string Dockerfile = Path.Combine(Processes.Root, "deploy/docker/Dockerfile");
    private const string Namespace = "backprop";

    /// <summary>Every folder under deploy/k8s that kubectl kustomize builds (components are only parts of them).</summary>
    private static IEnumerable<string> Kustomizations() =>
        Directory.EnumerateFiles(K8s, "kustomization.yaml", SearchOption.AllDirectories)
            .Where(f => !f.Contains("node_modules", StringComparison.Ordinal) && !File.ReadAllText(f).Contains("kind: Component", StringComparison.Ordinal))
            .Select(Path.GetDirectoryName).Select(d => d!).Order(StringComparer.Ordinal);

    private static readonly Lazy<Dictionary<string, List<JsonNode>>> Rendered = new(() =>
        Kustomizations().ToDictionary(d => d, d => Objects(Render(d))));

    /// <summary>The objects of one kustomization, by its folder under deploy/k8s ("" for deploy/k8s itself).</summary>
    private static List<JsonNode> Of(string dir) => Rendered.Value[Path.Combine(K8s, dir).TrimEnd('/')];

    private static List<JsonNode> Cluster => Of("");

    [Fact]
    public void Every_kustomization_renders_and_its_objects_pass_the_api_schema()
    {
        Assert.Equal(["", "base", "namespace", "overlays/tls", "overlays/workers-4", "overlays/workers-8", "train", "train-tls"],
            Kustomizations().Select(d => d == K8s ? "" : Path.GetRelativePath(K8s, d)).Order(StringComparer.Ordinal));
        Assert.True(Directory.Exists(Path.Combine(K8s, "node_modules")),
            "deploy/k8s/node_modules is missing: run `npm ci` in deploy/k8s (test.sh does)");
        foreach (var dir in Kustomizations())
        {
            var check = Tool("node", [Path.Combine(K8s, "validate.mjs")], stdin: Render(dir));
            Assert.True(check.Code == 0, $"{Path.GetRelativePath(Processes.Root, dir)}: {check.Output}");
            Assert.Contains(" valid, 0 invalid", check.Output);
        }
    }

    [Fact]
    public void The_namespace_and_the_train_job_live_apart_from_the_cluster()
    {
        // `kubectl delete -k deploy/k8s` must keep the namespace (its Secrets, Redis' volume claim); the runs are Jobs
        // made one by one, never part of a kustomization that is applied again.
        foreach (var (dir, objects) in Rendered.Value.Where(r => !r.Key.EndsWith("/namespace", StringComparison.Ordinal)))
        {
            Assert.DoesNotContain(objects, o => Kind(o) == "Namespace");
            Assert.DoesNotContain(objects, o => Kind(o) == "Job");
            Assert.All(objects, o => Assert.True(Str(o["metadata"]!["namespace"]) == Namespace, $"{dir}: {Id(o)} is not in {Namespace}"));
        }
        foreach (var dir in new[] { "", "base", "overlays/tls", "overlays/workers-4", "overlays/workers-8" })
            Assert.DoesNotContain(Of(dir), o => Kind(o) == "CronJob");
        Assert.Equal(["Namespace/backprop"], Of("namespace").Select(Id));
        Assert.Equal(["CronJob/backprop-train"], Of("train").Select(Id));
        Assert.Equal(["CronJob/backprop-train"], Of("train-tls").Select(Id));
        var redis = Cluster.Single(o => Kind(o) == "StatefulSet" && Name(o) == "redis");
        Assert.Equal("Retain", Str(redis["spec"]!["persistentVolumeClaimRetentionPolicy"]?["whenDeleted"]));
    }

    [Fact]
    public void Selectors_match_the_pod_labels_and_services_reach_named_ports()
    {
        foreach (var (dir, objects) in Rendered.Value)
        {
            var workloads = objects.Where(o => Kind(o) is "Deployment" or "StatefulSet").ToList();
            foreach (var w in workloads)
            {
                var selector = Map(w["spec"]!["selector"]!["matchLabels"]);
                var labels = PodLabels(w);
                Assert.NotEmpty(selector);
                Assert.All(selector, kv => Assert.True(labels.GetValueOrDefault(kv.Key) == kv.Value,
                    $"{dir}: {Id(w)}: selector {kv.Key}={kv.Value} is not on its pods ({Show(labels)})"));
            }
            foreach (var service in objects.Where(o => Kind(o) == "Service"))
            {
                var selector = Map(service["spec"]!["selector"]);
                var pods = workloads.Where(w => Matches(selector, PodLabels(w))).ToList();
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
        var objects = Cluster;
        var settings = SiloSettings(objects);
        int siloPort = int.Parse(settings["BACKPROP_SILO_PORT"]), gatewayPort = int.Parse(settings["BACKPROP_GATEWAY_PORT"]),
            httpPort = int.Parse(settings["BACKPROP_HTTP_PORT"]), lanePort = int.Parse(settings["BACKPROP_LANE_PORT"]);
        // A fixed lane port: the network policy can only allow a port it knows (0 would be any free one).
        Assert.InRange(lanePort, 1, 65535);
        var silos = SiloDeployments(objects);
        Assert.Equal(["backprop-server", "backprop-worker"], silos.Select(Name).Order());
        foreach (var silo in silos)
        {
            Assert.Equal(siloPort, ContainerPort(silo, "silo"));
            Assert.Equal(lanePort, ContainerPort(silo, "lane"));
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
            // The startup probe holds liveness back for longer than a starting silo waits for Redis: a silo waiting
            // for Redis' volume to bind is never restarted for it.
            var startup = container["startupProbe"]!;
            int window = int.Parse(Str(startup["failureThreshold"])!) * int.Parse(Str(startup["periodSeconds"])!);
            Assert.True(window > int.Parse(settings["BACKPROP_REDIS_WAIT"]),
                $"{Id(silo)}: startupProbe allows {window} s, BACKPROP_REDIS_WAIT is {settings["BACKPROP_REDIS_WAIT"]} s");
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
    public void Silo_pods_advertise_their_pod_ip_tolerate_stalls_and_get_longer_than_the_shutdown_timeout()
    {
        foreach (var (dir, objects) in Rendered.Value.Where(r => SiloDeployments(r.Value).Count > 0))
        {
            var settings = SiloSettings(objects);
            foreach (var silo in SiloDeployments(objects))
            {
                var env = Container(silo)["env"]!.AsArray().ToDictionary(e => Str(e!["name"])!, e => e!);
                Assert.Equal(Map(silo["metadata"]!["labels"])["app.kubernetes.io/component"], Str(env["BACKPROP_ROLE"]["value"]));
                Assert.Equal("true", Str(env["BACKPROP_KUBERNETES"]["value"]));
                Assert.Equal("status.podIP", Str(env["POD_IP"]["valueFrom"]?["fieldRef"]?["fieldPath"]));
                Assert.Equal("metadata.name", Str(env["POD_NAME"]["valueFrom"]?["fieldRef"]?["fieldPath"]));
                // The host gives a stopping silo BACKPROP_SHUTDOWN_TIMEOUT; Kubernetes must wait longer before SIGKILL.
                int grace = int.Parse(Str(PodSpec(silo)["terminationGracePeriodSeconds"])!);
                Assert.True(grace > int.Parse(settings["BACKPROP_SHUTDOWN_TIMEOUT"]),
                    $"{dir}: {Id(silo)}: terminationGracePeriodSeconds {grace} <= BACKPROP_SHUTDOWN_TIMEOUT {settings["BACKPROP_SHUTDOWN_TIMEOUT"]}");
            }
            // A silo must be silent for 10 s or more, as seen by two peers, before it is declared dead.
            double probe = double.Parse(settings["BACKPROP_PROBE_TIMEOUT"], System.Globalization.CultureInfo.InvariantCulture);
            Assert.True(probe * int.Parse(settings["BACKPROP_MISSED_PROBES"]) >= 10, $"{dir}: {Show(settings)}");
            Assert.True(int.Parse(settings["BACKPROP_DEATH_VOTES"]) >= 2, $"{dir}: {Show(settings)}");
        }
        // Compose stops silos the same way.
        var services = Compose()["services"]!;
        foreach (var name in new[] { "server", "worker" })
            Assert.True(Seconds(Str(services[name]!["stop_grace_period"])!) > int.Parse(Str(services[name]!["environment"]!["BACKPROP_SHUTDOWN_TIMEOUT"])!),
                $"compose {name}: stop_grace_period is not above BACKPROP_SHUTDOWN_TIMEOUT");
    }

    [Fact]
    public void Nothing_talks_to_the_api_server()
    {
        // The silos advertise POD_IP themselves and find each other in Redis: no ServiceAccount token, no RBAC.
        foreach (var (dir, objects) in Rendered.Value)
        {
            Assert.DoesNotContain(objects, o => Kind(o) is "ServiceAccount" or "Role" or "RoleBinding" or "ClusterRole" or "ClusterRoleBinding");
            foreach (var (owner, pod) in Pods(objects))
            {
                Assert.True(Str(pod["spec"]!["automountServiceAccountToken"]) == "false", $"{dir}: {Id(owner)} mounts a ServiceAccount token");
                Assert.Null(pod["spec"]!["serviceAccountName"]);
                Assert.DoesNotContain(Map(pod["metadata"]?["labels"]).Keys, k => k.StartsWith("orleans/", StringComparison.Ordinal));
            }
        }
    }

    [Fact]
    public void Every_pod_meets_the_restricted_pod_security_profile_and_writes_only_to_volumes()
    {
        var ns = Of("namespace").Single();
        Assert.Equal("restricted", Map(ns["metadata"]!["labels"])["pod-security.kubernetes.io/enforce"]);
        var allowedVolumes = new[] { "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret" };
        int pods = 0;
        foreach (var (dir, objects) in Rendered.Value)
            foreach (var (owner, pod) in Pods(objects))
            {
                pods++;
                string who = $"{Path.GetRelativePath(K8s, dir)}: {Id(owner)}";
                var spec = pod["spec"]!;
                foreach (var host in new[] { "hostNetwork", "hostPID", "hostIPC" }) Assert.True(Str(spec[host]) is null or "false", $"{who}: {host}");
                var podSecurity = spec["securityContext"];
                Assert.True(Str(podSecurity?["runAsNonRoot"]) == "true", $"{who}: runAsNonRoot is not true");
                Assert.True(int.TryParse(Str(podSecurity?["runAsUser"]), out int uid) && uid > 0, $"{who}: runAsUser is not a non-root uid");
                foreach (var volume in spec["volumes"]?.AsArray() ?? [])
                    Assert.True(volume!.AsObject().Select(kv => kv.Key).Where(k => k != "name").All(allowedVolumes.Contains),
                        $"{who}: volume {Str(volume["name"])} is of a kind `restricted` forbids");
                var containers = (spec["containers"]?.AsArray() ?? []).Concat(spec["initContainers"]?.AsArray() ?? []).ToList();
                Assert.NotEmpty(containers);
                foreach (var container in containers)
                {
                    var security = container!["securityContext"];
                    string at = $"{who} container {Str(container["name"])}";
                    Assert.True((Str(security?["seccompProfile"]?["type"]) ?? Str(podSecurity?["seccompProfile"]?["type"])) == "RuntimeDefault", $"{at}: seccomp is not RuntimeDefault");
                    Assert.True(Str(security?["allowPrivilegeEscalation"]) == "false", $"{at}: allowPrivilegeEscalation is not false");
                    Assert.True(Str(security?["privileged"]) is null or "false", $"{at}: privileged");
                    Assert.Contains("ALL", security?["capabilities"]?["drop"]?.AsArray().Select(Str) ?? []);
                    Assert.Null(security?["capabilities"]?["add"]);
                    Assert.True(Str(security?["readOnlyRootFilesystem"]) == "true", $"{at}: the root filesystem is writable");
                    // Where the programs write: /tmp (.NET, the shell's here-documents), Redis' /data.
                    var mounts = (container["volumeMounts"]?.AsArray() ?? []).Where(m => Str(m!["readOnly"]) != "true")
                        .ToDictionary(m => Str(m!["mountPath"])!, m => Str(m!["name"])!);
                    Assert.True(mounts.TryGetValue("/tmp", out var tmp), $"{at}: nothing writable on /tmp");
                    Assert.NotNull(spec["volumes"]!.AsArray().Single(v => Str(v!["name"]) == tmp)!["emptyDir"]);
                    if (Str(container["name"]) == "redis") Assert.True(mounts.ContainsKey("/data"), $"{at}: /data is not writable");
                }
            }
        // Redis, the server and the worker silos in each of the 5 renders of the cluster (deploy/k8s, its base and 3
        // overlays), and the 2 train templates.
        Assert.Equal(5 * 3 + 2, pods);
    }

    [Fact]
    public void Every_image_comes_from_the_one_images_entry_with_an_immutable_reference()
    {
        // Exactly one kustomization sets images: the component that the base and the train template include.
        var withImages = Directory.EnumerateFiles(K8s, "kustomization.yaml", SearchOption.AllDirectories)
            .Where(f => !f.Contains("node_modules", StringComparison.Ordinal) && Regex.IsMatch(File.ReadAllText(f), @"^images:", RegexOptions.Multiline)).ToList();
        string file = Assert.Single(withImages);
        Assert.Equal("components/image/kustomization.yaml", Path.GetRelativePath(K8s, file));
        var entries = Objects(File.ReadAllText(file)).Single()["images"]!.AsArray().ToDictionary(i => Str(i!["name"])!, i => i!);
        Assert.Equal(["backprop-distributed", "redis"], entries.Keys.Order());
        var references = entries.Values.Select(e => (Str(e["newName"]) ?? Str(e["name"]))
            + (Str(e["digest"]) is { } d ? "@" + d : ":" + Str(e["newTag"]))).ToHashSet();

        var product = entries["backprop-distributed"];
        // Pushed to a registry the nodes can pull from: a host name before the first '/'.
        Assert.Matches(@"^[a-z0-9.-]+\.[a-z]+(:\d+)?/", Str(product["newName"]));
        foreach (var entry in entries.Values)
        {
            // A digest, or a tag that names one build; never a moving one.
            string? digest = Str(entry["digest"]), tag = Str(entry["newTag"]);
            Assert.True(digest is not null ? Regex.IsMatch(digest, "^sha256:[0-9a-f]{64}$") : tag is not null && Regex.IsMatch(tag, @"^(v?\d+\.\d+\.\d+.*|[0-9a-f]{7,40})$"),
                $"image {Str(entry["name"])}: tag '{tag}' may move; use a release version, a commit id or a digest");
        }
        foreach (var (dir, objects) in Rendered.Value)
            foreach (var (owner, pod) in Pods(objects))
                foreach (var container in pod["spec"]!["containers"]!.AsArray())
                {
                    Assert.True(references.Contains(Str(container!["image"])!), $"{dir}: {Id(owner)}: image {Str(container["image"])} is not one of {string.Join(", ", references)}");
                    Assert.Equal("IfNotPresent", Str(container["imagePullPolicy"]));
                }
    }

    [Fact]
    public void The_dockerfile_fetches_the_data_first_apart_from_the_code_and_pins_its_base_images_by_digest()
    {
        var lines = File.ReadAllLines(Dockerfile).Where(l => !l.TrimStart().StartsWith('#') && l.Trim().Length > 0).ToList();
        var args = lines.Where(l => l.StartsWith("ARG ", StringComparison.Ordinal) && l.Contains('='))
            .Select(l => l[4..].Split('=', 2)).ToDictionary(p => p[0], p => p[1]);
        var stages = lines.Select((l, i) => (Line: l, Index: i)).Where(x => x.Line.StartsWith("FROM ", StringComparison.Ordinal)).ToList();
        Assert.Equal(3, stages.Count);
        foreach (var (from, _) in stages)
        {
            // FROM ${ARG} [AS name], the ARG's default a tag pinned by digest.
            var image = Regex.Match(from, @"^FROM \$\{([A-Z_]+)\}").Groups[1].Value;
            Assert.True(args.TryGetValue(image, out var reference), $"'{from}' does not name an ARG with a default image");
            Assert.Matches(@"^mcr\.microsoft\.com/dotnet/[a-z]+:[0-9.]+@sha256:[0-9a-f]{64}$", reference);
        }
        List<string> Stage(int s) => lines.Skip(stages[s].Index + 1).Take((s + 1 < stages.Count ? stages[s + 1].Index : lines.Count) - stages[s].Index - 1).ToList();
        // The data stage comes first and takes nothing of the sources: a code change leaves its cache and layer alone.
        Assert.EndsWith(" AS data", stages[0].Line);
        var data = Stage(0);
        Assert.Contains(data, l => l.Contains("fetch-data.sh", StringComparison.Ordinal) && l.StartsWith("RUN", StringComparison.Ordinal));
        Assert.All(data.Where(l => l.StartsWith("COPY", StringComparison.Ordinal)), l => Assert.Matches(@"^COPY deploy/docker/[\w.-]+( deploy/docker/[\w.-]+)* /", l));
        // The runtime image takes the data before the code.
        var runtime = Stage(2).Where(l => l.StartsWith("COPY", StringComparison.Ordinal)).ToList();
        Assert.StartsWith("COPY --link --from=data ", runtime[0]);
        Assert.All(runtime.Skip(1), l => Assert.StartsWith("COPY --link --from=build ", l));

        // The data stage checks the files against the hashes the product pins, for every data set it knows.
        var sums = File.ReadAllLines(Path.Combine(Processes.Root, "deploy/docker/data.sha256"))
            .Select(l => l.Split("  ", 2)).ToDictionary(p => p[1], p => p[0]);
        var expected = new Dictionary<string, string>();
        foreach (var source in DatasetCatalog.Names.Select(DatasetCatalog.Get))
            foreach (var (name, hash) in source.Sha256)
                expected[$"{source.Name}/{name}{(source.Gzip ? ".gz" : "")}"] = hash;
        Assert.Equal(expected.OrderBy(kv => kv.Key), sums.OrderBy(kv => kv.Key));
        var script = File.ReadAllText(Path.Combine(Processes.Root, "deploy/docker/fetch-data.sh"));
        Assert.All(DatasetCatalog.Names, n => Assert.Contains($"\n    {n})", script));
        Assert.Contains("sha256sum -c", script);
    }

    [Fact]
    public void Every_long_running_container_has_probes_with_timeouts_and_a_cpu_request_without_a_cpu_limit()
    {
        foreach (var (dir, objects) in Rendered.Value)
            foreach (var (owner, pod) in Pods(objects))
                foreach (var container in pod["spec"]!["containers"]!.AsArray())
                {
                    string at = $"{Path.GetRelativePath(K8s, dir)}: {Id(owner)} container {Str(container!["name"])}";
                    // A CPU limit throttles a busy silo (or Redis) until peers vote it dead; memory keeps its limit.
                    var resources = container["resources"];
                    Assert.True(Str(resources?["requests"]?["cpu"]) is not null, $"{at}: no CPU request");
                    Assert.True(Str(resources?["limits"]?["memory"]) is not null, $"{at}: no memory limit");
                    Assert.True(Str(resources?["limits"]?["cpu"]) is null, $"{at}: a CPU limit");
                    if (Kind(owner) == "CronJob") continue;   // a run's client ends with its run
                    foreach (var probe in new[] { "readinessProbe", "livenessProbe" })
                        Assert.True(container[probe] is not null, $"{at}: no {probe}");
                    foreach (var probe in new[] { "startupProbe", "readinessProbe", "livenessProbe" }.Where(p => container[p] is not null))
                        foreach (var field in new[] { "timeoutSeconds", "periodSeconds", "failureThreshold" })
                            Assert.True(Str(container[probe]![field]) is not null, $"{at}: {probe} has no explicit {field}");
                }
    }

    [Fact]
    public void Server_silos_have_a_disruption_budget_and_worker_silos_spread_over_nodes()
    {
        foreach (var (dir, objects) in Rendered.Value.Where(r => SiloDeployments(r.Value).Count > 0))
        {
            var server = SiloDeployments(objects).Single(d => Name(d) == "backprop-server");
            var budget = objects.Single(o => Kind(o) == "PodDisruptionBudget");
            Assert.True(Matches(Map(budget["spec"]!["selector"]!["matchLabels"]), PodLabels(server)), $"{dir}: the budget does not select the server silos");
            Assert.False(Matches(Map(budget["spec"]!["selector"]!["matchLabels"]), PodLabels(SiloDeployments(objects).Single(d => Name(d) == "backprop-worker"))));
            // minAvailable equal to the replicas would block every node drain; one at a time lets drains go on.
            Assert.Equal("1", Str(budget["spec"]!["maxUnavailable"]));
            Assert.Null(budget["spec"]!["minAvailable"]);

            var worker = SiloDeployments(objects).Single(d => Name(d) == "backprop-worker");
            var spread = PodSpec(worker)["topologySpreadConstraints"]?.AsArray().SingleOrDefault(c => Str(c!["topologyKey"]) == "kubernetes.io/hostname");
            Assert.True(spread is not null, $"{dir}: worker silos have no spread over nodes");
            Assert.True(Matches(Map(spread["labelSelector"]!["matchLabels"]), PodLabels(worker)));
            Assert.False(Matches(Map(spread["labelSelector"]!["matchLabels"]), PodLabels(server)), "the spread counts server silos too");
        }
    }

    [Fact]
    public void Network_policies_let_only_silos_and_clients_reach_the_cluster_ports()
    {
        foreach (var (dir, objects) in Rendered.Value.Where(r => SiloDeployments(r.Value).Count > 0))
        {
            var settings = SiloSettings(objects);
            int silo = int.Parse(settings["BACKPROP_SILO_PORT"]), gateway = int.Parse(settings["BACKPROP_GATEWAY_PORT"]),
                lane = int.Parse(settings["BACKPROP_LANE_PORT"]), http = int.Parse(settings["BACKPROP_HTTP_PORT"]), redisPort = int.Parse(Map(ConfigMap(objects, "backprop-cluster")["data"])["BACKPROP_REDIS"].Split(':')[1]);
            var policies = objects.Where(o => Kind(o) == "NetworkPolicy").ToList();
            var server = PodLabels(SiloDeployments(objects).Single(d => Name(d) == "backprop-server"));
            var worker = PodLabels(SiloDeployments(objects).Single(d => Name(d) == "backprop-worker"));
            var redis = PodLabels(objects.Single(o => Kind(o) == "StatefulSet" && Name(o) == "redis"));
            var client = Map(Of("train").Single()["spec"]!["jobTemplate"]!["spec"]!["template"]!["metadata"]!["labels"]);
            var other = new Dictionary<string, string> { ["app.kubernetes.io/name"] = "something-else" };

            void Check(bool expected, Dictionary<string, string> from, Dictionary<string, string>? to, int port, string protocol = "TCP") =>
                Assert.True(expected == Allowed(policies, from, to, port, protocol),
                    $"{Path.GetRelativePath(K8s, dir)}: {Show(from)} -> {(to is null ? "outside the namespace" : Show(to))}:{port}/{protocol} should be {(expected ? "allowed" : "dropped")}");

            foreach (var target in new[] { server, worker })
            {
                Check(true, worker, target, silo);
                Check(true, server, target, silo);
                Check(false, client, target, silo);
                Check(false, other, target, silo);
                Check(false, redis, target, silo);
                Check(true, worker, target, lane);
                Check(true, server, target, lane);
                Check(false, client, target, lane);
                Check(false, other, target, lane);
                Check(true, client, target, gateway);
                Check(false, other, target, gateway);
                Check(false, redis, target, gateway);
                Check(true, other, target, http);   // the kubelet's probes
            }
            foreach (var from in new[] { server, worker, client }) Check(true, from, redis, redisPort);
            Check(false, other, redis, redisPort);
            foreach (var from in new[] { server, worker, client, redis }) Check(false, from, null, 443);
            foreach (var from in new[] { server, worker, client })
            {
                Check(true, from, null, 53, "UDP");
                Check(true, from, null, 53, "TCP");
            }
            // Every pod of the cluster and every client is behind a policy (everything else is dropped).
            foreach (var labels in new[] { server, worker, redis, client })
                Assert.Contains(policies, p => Selects(p["spec"]!["podSelector"], labels) && p["spec"]!["policyTypes"]!.AsArray().Select(Str).Contains("Ingress"));
        }
    }

    [Fact]
    public void The_train_template_makes_one_run_per_job_that_waits_for_the_cluster_and_uses_every_worker_silo()
    {
        var cronJob = Of("train").Single();
        Assert.Equal("true", Str(cronJob["spec"]!["suspend"]));   // a template only: never scheduled
        var pod = Template(cronJob);
        Assert.Equal("Never", Str(pod["spec"]!["restartPolicy"]));
        Assert.Equal("true", Map(pod["metadata"]!["labels"]).GetValueOrDefault("backprop/client"));
        var container = Container(cronJob);
        var args = container["args"]!.AsArray().Select(s => Str(s)!).ToList();
        Assert.Equal("train", args[0]);
        Assert.Equal("$(BACKPROP_REDIS)", Arg(args, "--redis"));
        Assert.DoesNotContain("--workers", args);
        Assert.True(int.Parse(Arg(args, "--connect-timeout")) >= 300, "the Job gives up on the cluster too soon");
        // The run id is the Job's name, which the Job controller puts on its pods.
        Assert.Equal("$(JOB_NAME)", Arg(args, "--run-id"));
        var jobName = container["env"]!.AsArray().Single(e => Str(e!["name"]) == "JOB_NAME")!;
        Assert.Equal("metadata.labels['batch.kubernetes.io/job-name']", Str(jobName["valueFrom"]!["fieldRef"]!["fieldPath"]));
        // The cluster's settings under a name that does not change with them, with the silos' values.
        string map = Str(Assert.Single(container["envFrom"]!.AsArray())!["configMapRef"]!["name"])!;
        var clientMap = Cluster.SingleOrDefault(o => Kind(o) == "ConfigMap" && Name(o) == map);
        Assert.True(clientMap is not null, $"the cluster has no ConfigMap named {map} (a generated name has a hash suffix)");
        Assert.Equal(Map(ConfigMap(Cluster, "backprop-cluster")["data"]), Map(clientMap["data"]));
    }

    [Fact]
    public void Every_environment_variable_and_flag_set_is_one_the_silo_or_the_cli_reads()
    {
        var siloHelp = Tool("dotnet", [Path.Combine(Processes.Root, "src/Silo/bin", Processes.Configuration, "net10.0/Backprop.Silo.dll"), "--help"]);
        var trainHelp = Processes.Cli("train", "--help");
        var siloReads = EnvVarsInHelp(siloHelp.Code, siloHelp.Output);
        var cliReads = EnvVarsInHelp(trainHelp.Code, trainHelp.Output);
        Assert.Contains("BACKPROP_REDIS", cliReads);

        // Where each variable is set, and by which program it is read. A variable that the container's own args
        // use ($(NAME), expanded by Kubernetes) is the manifest's, not the program's.
        var silo = new SortedSet<string>(StringComparer.Ordinal);
        var cli = new SortedSet<string>(StringComparer.Ordinal);
        var cliFlags = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var objects in Rendered.Value.Values)
            foreach (var w in objects.Where(o => Kind(o) is "Deployment" or "CronJob"))
            {
                var args = Container(w)["args"]?.AsArray().Select(a => Str(a)!).ToList() ?? [];
                var expanded = args.SelectMany(a => Regex.Matches(a, @"\$\(([A-Z_]+)\)").Select(m => m.Groups[1].Value)).ToHashSet();
                (Kind(w) == "CronJob" ? cli : silo).UnionWith(EnvOf(w, objects).Where(v => !expanded.Contains(v)));
                if (Kind(w) == "CronJob") cliFlags.UnionWith(args.Where(a => a.StartsWith("--", StringComparison.Ordinal)));
            }
        var compose = Compose();
        foreach (var (name, service) in compose["services"]!.AsObject().Where(s => s.Key != "redis"))
        {
            var set = name == "train" ? cli : silo;
            set.UnionWith(service!["environment"]?.AsObject().Select(kv => kv.Key) ?? []);
            // The silo's entrypoint sets its own address (BACKPROP_HOST=$(hostname -i) ...).
            set.UnionWith(Regex.Matches(string.Join(' ', service["entrypoint"]?.AsArray().Select(Str) ?? []), @"\b(BACKPROP_[A-Z0-9_]+)=")
                .Select(m => m.Groups[1].Value));
            if (name == "train") cliFlags.UnionWith(service["command"]!.AsArray().Select(a => Str(a)!).Where(a => a.StartsWith("--", StringComparison.Ordinal)));
        }
        // The image's ENV reaches the silo and the CLI alike.
        var dockerfileEnv = Regex.Matches(File.ReadAllText(Dockerfile), @"^ENV\s+(BACKPROP_[A-Z0-9_]+)=", RegexOptions.Multiline).Select(m => m.Groups[1].Value).ToList();
        silo.UnionWith(dockerfileEnv);
        cli.UnionWith(dockerfileEnv);

        Assert.Contains("BACKPROP_ROLE", silo);
        Assert.Contains("BACKPROP_REDIS", cli);
        Assert.Contains("--connect-timeout", cliFlags);
        var siloMissing = silo.Where(v => !siloReads.Contains(v)).ToList();
        var cliMissing = cli.Where(v => !cliReads.Contains(v)).ToList();
        var flagsMissing = cliFlags.Where(f => !Regex.IsMatch(trainHelp.Output, $@"(^|\s){Regex.Escape(f)}\b", RegexOptions.Multiline)).ToList();
        Assert.True(siloMissing.Count == 0 && cliMissing.Count == 0 && flagsMissing.Count == 0,
            $"set by the manifests but not in the silo's --help: {string.Join(", ", siloMissing)}; " +
            $"not in the CLI's train --help: {string.Join(", ", cliMissing.Concat(flagsMissing))}");
    }

    [Fact]
    public void The_tls_overlay_and_template_give_every_silo_and_the_train_job_certificates_from_a_secret_and_the_peer_name()
    {
        var silos = SiloDeployments(Of("overlays/tls"));
        var job = Of("train-tls").Single();
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
                var volume = PodSpec(workload)["volumes"]!.AsArray().Single(v => Str(v!["name"]) == Str(mount["name"]));
                Assert.False(string.IsNullOrEmpty(Str(volume!["secret"]?["secretName"])), $"{Id(workload)}: volume {Str(mount["name"])} is not a Secret");
            }
            // Pod IPs change: silos and the CLI check a name that every silo certificate carries.
            Assert.True(env.TryGetValue("BACKPROP_TLS_PEER_NAME", out var peerName) && peerName is { Length: > 0 }, $"{Id(workload)}: no BACKPROP_TLS_PEER_NAME");
            peerNames.Add(peerName!);
        }
        Assert.Contains("backprop-tls-client", PodSpec(job)["volumes"]!.AsArray().Select(v => Str(v!["secret"]?["secretName"])));
        // One name, and the one the development certificates carry.
        string name = Assert.Single(peerNames);
        var script = File.ReadAllText(Path.Combine(Processes.Root, "deploy/local/make-dev-certs.sh"));
        Assert.Equal(name, Regex.Match(script, @"NAME=\$\{BACKPROP_CERT_NAME:-([^}]+)\}").Groups[1].Value);
        // Without the component, no TLS.
        var plain = Container(Of("train").Single());
        Assert.DoesNotContain(plain["env"]?.AsArray() ?? [], e => Str(e!["name"])!.StartsWith("BACKPROP_TLS_", StringComparison.Ordinal));
    }

    [Fact]
    public void The_worker_overlays_change_only_the_worker_replica_count()
    {
        var baseObjects = Cluster.ToDictionary(Id, o => o.ToJsonString());
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
        // train is a one-shot: only with its profile, after the silos report ready; one worker per worker silo.
        Assert.Equal("train", Str(services["train"]!["profiles"]![0]));
        var command = services["train"]!["command"]!.AsArray().Select(s => Str(s)!).ToList();
        Assert.Equal("train", command[0]);
        Assert.DoesNotContain("--workers", command);
        foreach (var silo in new[] { "server", "worker" })
            Assert.Equal("service_healthy", Str(services["train"]!["depends_on"]![silo]!["condition"]));
        // The image is built once (one build section) and every silo and train run that image.
        var built = Assert.Single(services, s => s.Value!["build"] is not null);
        Assert.Equal("server", built.Key);
        Assert.All(new[] { "worker", "train" }, s => Assert.Equal(Str(services["server"]!["image"]), Str(services[s]!["image"])));
        // Redis keeps its append-only file on a named volume.
        var redis = services["redis"]!;
        Assert.Contains("--appendonly yes", string.Join(' ', redis["entrypoint"]!.AsArray().Select(Str)));
        Assert.StartsWith("redis-data:/data", Str(redis["volumes"]![0]));
    }

    [Fact]
    public void Compose_restarts_what_stops_runs_redis_as_a_user_and_hands_the_password_over_as_a_secret()
    {
        var compose = Compose();
        var services = compose["services"]!.AsObject();
        // A silo Orleans declared dead exits; it must come back. The one-shot train must not run again by itself.
        foreach (var name in new[] { "redis", "server", "worker" })
            Assert.Contains(Str(services[name]!["restart"]) ?? "(none)", new[] { "unless-stopped", "always", "on-failure" });
        Assert.Equal("no", Str(services["train"]!["restart"]) ?? "no");

        var user = Str(services["redis"]!["user"]);
        Assert.True(user is not null && !Regex.IsMatch(user, @"^(0|root)(:|$)"), $"redis runs as '{user}'");

        // The password is a secret from a file, never an environment variable; each reader names the secret's file.
        var secret = Assert.Single(compose["secrets"]!.AsObject());
        Assert.NotNull(Str(secret.Value!["file"]));
        foreach (var (name, service) in services)
        {
            var env = service!["environment"]?.AsObject() ?? new JsonObject();
            Assert.DoesNotContain(env, kv => kv.Key.Contains("PASSWORD", StringComparison.Ordinal) && !kv.Key.EndsWith("_FILE", StringComparison.Ordinal));
            Assert.True(service["secrets"]?.AsArray().Any(s => Str(s!["source"]) == secret.Key) == true, $"compose {name}: does not get the secret {secret.Key}");
            var text = string.Join(' ', (service["entrypoint"]?.AsArray() ?? []).Concat(service["healthcheck"]?["test"]?.AsArray() ?? []).Select(Str));
            if (name == "redis")
                Assert.Contains($"requirepass $$(cat /run/secrets/{secret.Key})", text);
            else
                Assert.Equal($"/run/secrets/{secret.Key}", Str(env["BACKPROP_REDIS_PASSWORD_FILE"]));
        }
    }

    [Fact]
    public void Redis_requires_the_password_of_a_secret_that_every_silo_and_the_train_job_read_as_a_file()
    {
        var redis = Cluster.Single(o => Kind(o) == "StatefulSet" && Name(o) == "redis");
        var redisContainer = Container(redis);
        var secretRef = redisContainer["env"]!.AsArray().Single(e => Str(e!["name"]) == "REDIS_PASSWORD")!["valueFrom"]!["secretKeyRef"]!;
        string secret = Str(secretRef["name"])!, key = Str(secretRef["key"])!;
        // The password goes to redis-server as configuration on stdin, not as an argument.
        var command = string.Join(' ', redisContainer["command"]!.AsArray().Select(Str));
        Assert.Contains("redis-server -", command);
        Assert.Contains("requirepass $REDIS_PASSWORD", command);
        Assert.Contains("REDISCLI_AUTH", string.Join(' ', redisContainer["readinessProbe"]!["exec"]!["command"]!.AsArray().Select(Str)));

        var readers = SiloDeployments(Cluster).Append(Of("train").Single()).ToList();
        Assert.Equal(3, readers.Count);
        foreach (var workload in readers)
        {
            var container = Container(workload);
            string? path = container["env"]!.AsArray().SingleOrDefault(e => Str(e!["name"]) == "BACKPROP_REDIS_PASSWORD_FILE")?["value"] is { } v ? Str(v) : null;
            Assert.True(path is not null, $"{Id(workload)}: no BACKPROP_REDIS_PASSWORD_FILE");
            var mount = container["volumeMounts"]!.AsArray().Single(m => path.StartsWith(Str(m!["mountPath"])! + "/", StringComparison.Ordinal))!;
            var volume = PodSpec(workload)["volumes"]!.AsArray().Single(v => Str(v!["name"]) == Str(mount["name"]))!;
            Assert.Equal(secret, Str(volume["secret"]?["secretName"]));
            // The file is the Secret's key, under the name the variable gives.
            string file = path[(Str(mount["mountPath"])!.Length + 1)..];
            Assert.Contains(volume["secret"]!["items"]!.AsArray(), i => Str(i!["key"]) == key && Str(i["path"]) == file);
        }
    }

    // ---- NetworkPolicy, as the API defines it (only what the manifests use: pod selectors in this namespace, numeric ports) ----

    /// <summary>
    /// Whether a pod with labels <paramref name="from"/> may open a connection to a pod with labels <paramref name="to"/>
    /// (null: an address outside the namespace, e.g. DNS) on a port: allowed by the egress side and the ingress side.
    /// A side no policy selects is open; a selected side lets through only what a rule of its policies allows.
    /// </summary>
    private static bool Allowed(List<JsonNode> policies, Dictionary<string, string> from, Dictionary<string, string>? to, int port, string protocol) =>
        SideAllows(policies, from, "Egress", "egress", "to", to, port, protocol)
        && (to is null || SideAllows(policies, to, "Ingress", "ingress", "from", from, port, protocol));

    private static bool SideAllows(List<JsonNode> policies, Dictionary<string, string> pod, string type, string rulesKey, string peersKey,
        Dictionary<string, string>? peer, int port, string protocol)
    {
        var selecting = policies.Where(p => Selects(p["spec"]!["podSelector"], pod)).ToList();
        // policyTypes must be explicit: their defaults depend on which rules are present.
        Assert.All(selecting, p => Assert.NotNull(p["spec"]!["policyTypes"]));
        selecting = selecting.Where(p => p["spec"]!["policyTypes"]!.AsArray().Select(Str).Contains(type)).ToList();
        if (selecting.Count == 0) return true;
        return selecting.SelectMany(p => p["spec"]![rulesKey]?.AsArray() ?? []).Any(rule =>
        {
            var peers = rule![peersKey]?.AsArray();
            bool peerOk = peers is null || peers.Count == 0 || peers.Any(q =>
            {
                Assert.True(q!["namespaceSelector"] is null && q["ipBlock"] is null, "only podSelector peers are modelled here");
                return peer is not null && Selects(q["podSelector"], peer);
            });
            var ports = rule["ports"]?.AsArray();
            bool portOk = ports is null || ports.Count == 0 || ports.Any(q =>
                int.Parse(Str(q!["port"])!) == port && (Str(q["protocol"]) ?? "TCP") == protocol);
            return peerOk && portOk;
        });
    }

    private static bool Selects(JsonNode? selector, Dictionary<string, string> labels)
    {
        Assert.True(selector?["matchExpressions"] is null, "only matchLabels selectors are modelled here");
        return Matches(Map(selector?["matchLabels"]), labels);
    }

    private static bool Matches(Dictionary<string, string> selector, Dictionary<string, string> labels) =>
        selector.All(kv => labels.GetValueOrDefault(kv.Key) == kv.Value);

    // ---- tools and YAML ----

    private static string Render(string dir)
    {
        var result = Tool("kubectl", ["kustomize", dir]);
        Assert.True(result.Code == 0, $"kubectl kustomize {dir}: {result.Output}");
        return result.Stdout;
    }

    private static JsonNode Compose()
    {
        var result = Tool("docker-compose", ["-f", ComposeFile, "config"]);
        Assert.True(result.Code == 0, $"docker-compose config: {result.Output}");
        return Objects(result.Stdout).Single();
    }

    private sealed record ToolResult(int Code, string Stdout, string Output);

    private static ToolResult Tool(string program, string[] args, string? stdin = null)
    {
        var psi = new ProcessStartInfo(program)
        {
            RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = stdin is not null,
            WorkingDirectory = Processes.Root,
        };
        foreach (var a in args) psi.ArgumentList.Add(a);
        Process process;
        try
        {
            process = Process.Start(psi)!;
        }
        catch (Win32Exception e)
        {
            throw new InvalidOperationException($"{program} is not installed ({e.Message}); test.sh installs it", e);
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

    private static HashSet<string> EnvVarsInHelp(int code, string output)
    {
        Assert.True(code == 0, output);
        // The programs document each variable as "[env NAME]" after the option it sets.
        var names = Regex.Matches(output, @"\[env\s+(BACKPROP_[A-Z0-9_]+)\]").Select(m => m.Groups[1].Value).ToHashSet();
        // The silo's --help names the pod's own variables under --kubernetes.
        names.UnionWith(Regex.Matches(output, @"\b(POD_(?:IP|NAME))\b").Select(m => m.Groups[1].Value));
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
            // The train template's ConfigMap is the base's (its fixed name).
            var source = objects.Concat(Cluster).First(o => Kind(o) == "ConfigMap" && Name(o) == map);
            foreach (var key in Map(source["data"]).Keys) yield return key;
        }
    }

    private static string Arg(List<string> args, string flag)
    {
        int at = args.IndexOf(flag);
        Assert.True(at >= 0 && at + 1 < args.Count, $"no {flag} in {string.Join(' ', args)}");
        return args[at + 1];
    }

    private static int Seconds(string duration) =>
        Regex.Match(duration, @"^(?:(\d+)m)?(?:(\d+)s)?$") is { Success: true } m
            ? (m.Groups[1].Success ? int.Parse(m.Groups[1].Value) * 60 : 0) + (m.Groups[2].Success ? int.Parse(m.Groups[2].Value) : 0)
            : throw new FormatException($"duration '{duration}'");

    private static List<JsonNode> SiloDeployments(List<JsonNode> objects) =>
        objects.Where(o => Kind(o) == "Deployment" && Map(o["metadata"]!["labels"]).GetValueOrDefault("app.kubernetes.io/name") == "backprop-silo").ToList();

    private static Dictionary<string, string> SiloSettings(List<JsonNode> objects) => Map(ConfigMap(objects, "backprop-silo")["data"]);

    /// <summary>A generated ConfigMap, by the name before kustomize's hash suffix.</summary>
    private static JsonNode ConfigMap(List<JsonNode> objects, string name) =>
        objects.Single(o => Kind(o) == "ConfigMap" && Regex.IsMatch(Name(o)!, $"^{name}-[a-z0-9]+$"));

    /// <summary>Every pod template of the objects, with the object that holds it.</summary>
    private static IEnumerable<(JsonNode Owner, JsonNode Pod)> Pods(List<JsonNode> objects) =>
        objects.Where(o => Kind(o) is "Deployment" or "StatefulSet" or "Job" or "CronJob" or "DaemonSet").Select(o => (o, Template(o)));

    private static JsonNode Template(JsonNode workload) =>
        Kind(workload) == "CronJob" ? workload["spec"]!["jobTemplate"]!["spec"]!["template"]! : workload["spec"]!["template"]!;

    private static JsonNode PodSpec(JsonNode workload) => Template(workload)["spec"]!;
    private static Dictionary<string, string> PodLabels(JsonNode workload) => Map(Template(workload)["metadata"]!["labels"]);
    private static JsonNode Container(JsonNode workload) => PodSpec(workload)["containers"]![0]!;

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
