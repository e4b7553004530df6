using System.Globalization;
using System.Text;

namespace Backprop.Core.Data;

/// <summary>
/// Reads a CSV data file: one sample a line, <c>label,v1,v2,...</c>, the label an integer 0..255 and each value an
/// integer 0..255 (like the bytes of an IDX image). A first line whose first field starts with a letter is a header
/// (Kaggle's <c>label,pixel0,...</c>) and is skipped. Every defect names the file and its 1-based line number.
/// A line is at most <see cref="MaxLineChars"/> characters, so that a file without line breaks cannot make the reader
/// allocate without bound.
/// </summary>
public static class CsvReader
{
    /// <summary>1 Mi characters: a row of the widest input a model takes (65,536 values of up to "255,") fits 4 times.</summary>
    public const int MaxLineChars = 1 << 20;

    public sealed record Samples(int Features, byte[] Pixels, byte[] Labels);

    /// <param name="features">The values a row must have (another file's), or null to take them from the first row.</param>
    /// <param name="classes">Labels must be below this (the training file's classes), or null for any byte.</param>
    public static Samples Read(string path, int? features = null, int? classes = null)
    {
        if (!File.Exists(path)) throw new DataFileException(path, "file not found");
        using var reader = new LineReader(new StreamReader(path), path);
        var labels = new List<byte>();
        var pixels = new byte[1 << 16];
        long filled = 0;
        int line = 0;
        int? width = features;
        int widthLine = 0;
        while (reader.Next(line + 1) is { } text)
        {
            line++;
            var row = text.AsSpan().TrimEnd('\r');
            if (line == 1 && row.Length > 0 && char.IsLetter(row[0])) continue;   // a header
            if (row.IsEmpty) throw new DataFileException(path, $"line {line}: empty line");
            int values = row.Count(',');
            if (values == 0) throw new DataFileException(path, $"line {line}: a label and no values");
            if (width is null)
            {
                if (values > ResourceLimits.MaxLayerWidth)
                    throw new DataFileException(path, $"line {line}: {values} values, more than a model's input of at most {ResourceLimits.MaxLayerWidth}");
                (width, widthLine) = (values, line);
            }
            if (values != width)
                throw new DataFileException(path, $"line {line}: {values} values, but {(widthLine > 0 ? $"line {widthLine} has" : "the training file's rows have")} {width}");
            if (filled + values > int.MaxValue - 1024) throw new DataFileException(path, $"line {line}: more data than this reader supports");
            if (filled + values > pixels.Length) Array.Resize(ref pixels, (int)Math.Min(int.MaxValue - 1024, Math.Max(filled + values, pixels.Length * 2L)));

            int column = 0;
            foreach (var range in row.Split(','))
            {
                var field = row[range].Trim(' ');
                if (!int.TryParse(field, NumberStyles.None, CultureInfo.InvariantCulture, out int value))
                    throw new DataFileException(path, column == 0
                        ? $"line {line}: label '{Shown(field)}' is not an integer"
                        : $"line {line}: value '{Shown(field)}' in column {column + 1} is not an integer");
                if (value > 255)
                    throw new DataFileException(path, column == 0
                        ? $"line {line}: label {value} is outside 0..255"
                        : $"line {line}: value {value} in column {column + 1} is outside 0..255");
                if (column == 0 && value >= classes)
                    throw new DataFileException(path, $"line {line}: label {value} is outside the training file's classes 0..{classes - 1}");
                if (column == 0) labels.Add((byte)value);
                else pixels[filled + column - 1] = (byte)value;
                column++;
            }
            filled += values;
        }
        if (labels.Count == 0) throw new DataFileException(path, line == 0 ? "empty file" : "no samples (only a header)");
        return new Samples(width!.Value, pixels.AsSpan(0, (int)filled).ToArray(), labels.ToArray());
    }

    /// <summary>Lines as StreamReader.ReadLine splits them at '\n', but refused past <see cref="MaxLineChars"/>.</summary>
    private sealed class LineReader(StreamReader reader, string path) : IDisposable
    {
        private readonly char[] _buffer = new char[1 << 16];
        private readonly StringBuilder _line = new();
        private int _start, _end;

        /// <summary>Line <paramref name="number"/> (1-based, for the message), without its '\n'; null at the end of the file.</summary>
        public string? Next(int number)
        {
            _line.Clear();
            while (true)
            {
                if (_start == _end)
                {
                    (_start, _end) = (0, reader.Read(_buffer, 0, _buffer.Length));
                    if (_end == 0) return _line.Length > 0 ? _line.ToString() : null;
                }
                int newline = Array.IndexOf(_buffer, '\n', _start, _end - _start);
                int take = (newline < 0 ? _end : newline) - _start;
                if (_line.Length + take > MaxLineChars)
                    throw new DataFileException(path, $"line {number}: longer than {MaxLineChars} characters");
                _line.Append(_buffer, _start, take);
                _start += take;
                if (newline < 0) continue;
                _start++;
                return _line.ToString();
            }
        }

        public void Dispose() => reader.Dispose();
    }

    /// <summary>A field as it appears in a message: short, and printable on one line.</summary>
    private static string Shown(ReadOnlySpan<char> field) => field.Length > 20 ? string.Concat(field[..20], "...") : field.ToString();
}
