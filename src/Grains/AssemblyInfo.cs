using System.Runtime.CompilerServices;

// The tests make one silo's workers slow on purpose (SiloSetup.DelayWorkersForTests); nothing else may.
[assembly: InternalsVisibleTo("Backprop.Tests")]
