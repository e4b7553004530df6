using System.Diagnostics;

namespace Backprop.Bench;

/// <summary>
/// Round trip of one cache line between two threads (each writes what the other waits for). On a VM this
/// tells where the host has put the two vCPUs: near (a shared L3) or far apart, where every cache line
/// that a thread reads after the other wrote it costs several times more.
/// </summary>
public static class CoreToCore
{
    private sealed class Line
    {
        public long Ping;
        public long Pong;
    }

    public static double RoundTripNanoseconds(int trips = 200_000)
    {
        var line = new Line();
        var echo = new Thread(() =>
        {
            for (long i = 1; i <= trips; i++)
            {
                while (Volatile.Read(ref line.Ping) != i) { }
                Volatile.Write(ref line.Pong, i);
            }
        }) { IsBackground = true };
        echo.Start();
        long start = Stopwatch.GetTimestamp();
        for (long i = 1; i <= trips; i++)
        {
            Volatile.Write(ref line.Ping, i);
            while (Volatile.Read(ref line.Pong) != i) { }
        }
        double ns = Stopwatch.GetElapsedTime(start).TotalNanoseconds / trips;
        echo.Join();
        return ns;
    }
}
