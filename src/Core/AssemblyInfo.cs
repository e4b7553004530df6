using System.Runtime.CompilerServices;

// The benchmarks time the unchecked pointer kernels themselves; nothing else outside Core may call them.
[assembly: InternalsVisibleTo("Backprop.Bench")]
