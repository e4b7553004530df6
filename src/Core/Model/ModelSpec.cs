namespace Backprop.Core.Model;

public enum Activation { Sigmoid, Tanh, Relu }

/// <summary>Output non-linearity and cost are chosen together: each pair has a simple output delta.</summary>
public enum Loss
{
    /// <summary>Sigmoid outputs, C = ½‖a − y‖² (the seed's network.py).</summary>
    Quadratic,
    /// <summary>Softmax outputs, C = −log a_y (PyTorch's CrossEntropyLoss).</summary>
    CrossEntropy,
}

public enum InitScheme
{
    /// <summary>Weights and biases N(0, 1), as in the seed's network.py.</summary>
    Normal,
    /// <summary>W ~ U(±1/√fan_in), b ~ U(±1/√fan_in): PyTorch's nn.Linear default.</summary>
    PyTorch,
    /// <summary>W ~ N(0, 2/fan_in), b = 0.</summary>
    He,
    /// <summary>W ~ U(±√(6/(fan_in+fan_out))), b = 0.</summary>
    Xavier,
}

/// <summary>A fully connected network: layer sizes from input to output, hidden activation, output+loss.</summary>
public sealed record ModelSpec(int[] Layers, Activation Activation, Loss Loss)
{
    public int InputSize => Layers[0];
    public int OutputSize => Layers[^1];
    public int LayerCount => Layers.Length - 1;

    public string Describe() =>
        $"[{string.Join(",", Layers)}] {Activation.ToString().ToLowerInvariant()} / {(Loss == Loss.Quadratic ? "sigmoid+quadratic" : "softmax+cross-entropy")}";

    /// <summary>Weights and biases of all layers; valid once <see cref="Validate"/> has passed (checked, so it cannot wrap).</summary>
    public long ParameterCount
    {
        get
        {
            long count = 0;
            for (int l = 0; l < LayerCount; l++) count = checked(count + (long)Layers[l] * Layers[l + 1] + Layers[l + 1]);
            return count;
        }
    }

    /// <summary>Throws <see cref="ArgumentException"/> naming the first thing wrong with the spec.</summary>
    public void Validate()
    {
        if (Layers is null || Layers.Length < 2)
            throw new ArgumentException("layers: need at least an input and an output size, e.g. 784,30,10");
        if (Layers.Length - 1 > ResourceLimits.MaxWeightLayers)
            throw new ArgumentException($"layers: {Layers.Length} sizes make {Layers.Length - 1} weight layers, over the limit of {ResourceLimits.MaxWeightLayers}");
        foreach (var n in Layers)
            if (n < 1 || n > ResourceLimits.MaxLayerWidth)
                throw new ArgumentException($"layers: size {n} is out of range 1..{ResourceLimits.MaxLayerWidth}");
        // An undefined value would throw deep in a backprop thread instead of here.
        if (!Enum.IsDefined(Activation)) throw new ArgumentException($"activation: {(int)Activation} is not a known activation");
        if (!Enum.IsDefined(Loss)) throw new ArgumentException($"loss: {(int)Loss} is not a known loss");
        if (Loss == Loss.CrossEntropy && OutputSize < 2)
            throw new ArgumentException("layers: softmax + cross-entropy needs at least 2 outputs");
        // Every evaluation carries a confusion matrix of outputs × outputs counts in one message.
        ResourceLimits.CheckMessageBytes(Training.Evaluation.ConfusionBytes(OutputSize), $"layers: output size {OutputSize} needs a {OutputSize} x {OutputSize} confusion matrix");
        long parameters = ParameterCount;
        if (parameters > ResourceLimits.MaxParameters)
            throw new ArgumentException($"layers: [{string.Join(",", Layers)}] has {parameters} parameters ({ResourceLimits.Bytes(parameters * sizeof(float))}), "
                + $"over the limit of {ResourceLimits.MaxParameters} ({ResourceLimits.Bytes(ResourceLimits.MaxMessageBytes)}, what one message carries)");
    }

    public bool Equals(ModelSpec? other) =>
        other is not null && Activation == other.Activation && Loss == other.Loss && Layers.AsSpan().SequenceEqual(other.Layers);

    public override int GetHashCode()
    {
        var h = new HashCode();
        h.Add(Activation);
        h.Add(Loss);
        foreach (var n in Layers) h.Add(n);
        return h.ToHashCode();
    }
}
