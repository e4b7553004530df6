namespace Backprop.Core.Model;

/// <summary>
/// Where each layer's weights and biases live in the one flat parameter vector.
/// Layer l (0-based, mapping Layers[l] → Layers[l+1]) has W (out × in, row-major) followed by b (out).
/// Gradients, momentum buffers, checkpoints and payloads all share this layout.
/// </summary>
public sealed class ParameterLayout
{
    private readonly int[] _weightOffsets;
    private readonly int[] _biasOffsets;

    /// <summary>Validates <paramref name="spec"/> first: its limits keep every offset within int range.</summary>
    public ParameterLayout(ModelSpec spec)
    {
        spec.Validate();
        Spec = spec;
        int layers = spec.LayerCount;
        _weightOffsets = new int[layers];
        _biasOffsets = new int[layers];
        int offset = 0;
        for (int l = 0; l < layers; l++)
        {
            _weightOffsets[l] = offset;
            offset = checked(offset + spec.Layers[l] * spec.Layers[l + 1]);
            _biasOffsets[l] = offset;
            offset = checked(offset + spec.Layers[l + 1]);
        }
        Length = offset;
    }

    public ModelSpec Spec { get; }
    public int Length { get; }
    public int LayerCount => _weightOffsets.Length;
    public int WeightOffset(int layer) => _weightOffsets[layer];
    public int BiasOffset(int layer) => _biasOffsets[layer];
    public int In(int layer) => Spec.Layers[layer];
    public int Out(int layer) => Spec.Layers[layer + 1];

    public Span<float> W(Span<float> flat, int layer) => flat.Slice(_weightOffsets[layer], In(layer) * Out(layer));
    public ReadOnlySpan<float> W(ReadOnlySpan<float> flat, int layer) => flat.Slice(_weightOffsets[layer], In(layer) * Out(layer));
    public Span<float> B(Span<float> flat, int layer) => flat.Slice(_biasOffsets[layer], Out(layer));
    public ReadOnlySpan<float> B(ReadOnlySpan<float> flat, int layer) => flat.Slice(_biasOffsets[layer], Out(layer));
}
