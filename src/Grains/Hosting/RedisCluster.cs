using System.Net;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Orleans.Configuration;
using Orleans.Serialization;
using Orleans.Storage;

namespace Backprop.Grains.Hosting;

/// <summary>
/// Redis clustering: membership, grain storage, reminders and the directory of runs' grains (<see cref="RunDirectory"/>) in one Redis. No silo is special (unlike
/// localhost clustering's primary), so any silo may die, and runs survive a restart of the whole cluster.
/// </summary>
public static class RedisCluster
{
    /// <summary>
    /// The service id of a Redis cluster. Orleans keys storage (<c>{ServiceId}/state/...</c>) and reminders
    /// (<c>{ServiceId}/reminders</c>) by service id only, so putting the cluster id in it keeps several
    /// clusters in one Redis apart. Clients that find gateways through Redis must use the same one.
    /// </summary>
    public static string ServiceIdOf(string clusterId) => $"{LocalClustering.ServiceId}-{clusterId}";

    /// <summary>
    /// The silo advertises <paramref name="advertised"/>; it listens there too, or, with <paramref name="listenOnAnyAddress"/>,
    /// on every address of the machine (a pod: the kubelet, Services and other pods reach it on the pod's interfaces).
    /// </summary>
    public static ISiloBuilder UseRedisCluster(this ISiloBuilder silo, RedisConnection redis, string clusterId, IPAddress advertised,
        bool listenOnAnyAddress, int siloPort, int gatewayPort, MembershipSettings membership)
    {
        silo.Configure<ClusterOptions>(o => { o.ClusterId = clusterId; o.ServiceId = ServiceIdOf(clusterId); });
        // Without listenOnAnyAddress, bind where we advertise: on one machine several silos may share ports on distinct loopback addresses.
        silo.ConfigureEndpoints(advertised, siloPort, gatewayPort, listenOnAnyAddress);
        silo.UseRedisClustering(o => o.ConfigurationOptions = redis.Options());
        silo.AddRedisGrainStorage(SiloSetup.StorageName, b => b.Configure<IServiceProvider>((o, services) =>
        {
            o.ConfigurationOptions = redis.Options();
            // A deleted run (evicted by the run list's retention) leaves no keys behind, not empty ones.
            o.DeleteStateOnClear = true;
            // Orleans' own binary format: parameter vectors are FloatPayloads with their own codec, which JSON would spell out float by float.
            o.GrainStorageSerializer = new OrleansGrainStorageSerializer(services.GetRequiredService<Serializer>());
        }));
        silo.UseRedisReminderService(o => o.ConfigurationOptions = redis.Options());
        // Coordinators, parameter-server shards and the registry: registered in Redis, so that no other silo's leaving deactivates them.
        silo.AddRedisRunDirectory(redis);
        membership.ApplyTo(silo);
        return silo;
    }
}

/// <summary>
/// The password of a Redis that requires AUTH: from a file (<c>--redis-password-file</c>, env
/// <c>BACKPROP_REDIS_PASSWORD_FILE</c>; a mounted Secret in Kubernetes) or from the environment variable
/// <c>BACKPROP_REDIS_PASSWORD</c> (compose). Never a command-line value: arguments are visible to every user of the
/// machine (ps). Never printed: <see cref="ToString"/> hides it, and messages name the file or the variable.
/// </summary>
public sealed class RedisPassword
{
    public const string Env = "BACKPROP_REDIS_PASSWORD", FileEnv = "BACKPROP_REDIS_PASSWORD_FILE";

    private RedisPassword(string value, string source)
    {
        Value = value;
        Source = source;
    }

    public string Value { get; }

    /// <summary>Where the password came from (the file or the variable), for messages.</summary>
    public string Source { get; }

    public override string ToString() => $"password from {Source}";

    /// <summary>
    /// The password in <paramref name="file"/> (its first line) or, without a file, in BACKPROP_REDIS_PASSWORD;
    /// null when neither is given. Throws <see cref="ArgumentException"/> (one line, naming the option) for a missing,
    /// unreadable or empty file, and when both are given (which one is meant is not clear).
    /// </summary>
    public static RedisPassword? Resolve(string? file)
    {
        string? fromEnv = Environment.GetEnvironmentVariable(Env) is { Length: > 0 } v ? v : null;
        if (string.IsNullOrWhiteSpace(file)) return fromEnv is null ? null : new RedisPassword(fromEnv, Env);
        if (fromEnv is not null) throw new ArgumentException($"--redis-password-file: given together with {Env}; give one of them");
        string text;
        try
        {
            text = File.ReadAllText(file);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new ArgumentException($"--redis-password-file: {file}: no such file");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"--redis-password-file: cannot read {file}: {e.Message.ReplaceLineEndings(" ")}");
        }
        // The first line: files written by echo or an editor end with a newline that is not part of the password.
        string password = text.Split('\n')[0].TrimEnd('\r');
        if (password.Length == 0) throw new ArgumentException($"--redis-password-file: {file} is empty");
        return new RedisPassword(password, file);
    }
}
