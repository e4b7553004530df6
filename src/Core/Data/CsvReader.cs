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
            var row = text.AsSpan();
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

    /// <summary>
    /// Lines as StreamReader.ReadLine splits them, at "\r\n", '\n' or a lone '\r' (old Mac files), but refused past
    /// <see cref="MaxLineChars"/> whichever ends them.
    /// </summary>
    private sealed class LineReader(StreamReader reader, string path) : IDisposable
    {
        private readonly char[] _buffer = new char[1 << 16];
        private readonly StringBuilder _line = new();
        private int _start, _end;
        /// <summary>The last line ended at a '\r': a '\n' right after it is part of that line's end.</summary>
        private bool _afterCr;

        /// <summary>Line <paramref name="number"/> (1-based, for the message), without its line end; null at the end of the file.</summary>
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
                if (_afterCr && _buffer[_start] == '\n') _start++;
                _afterCr = false;
                if (_start == _end) continue;
                int lineEnd = _buffer.AsSpan(_start, _end - _start).IndexOfAny('\r', '\n');
                int take = lineEnd < 0 ? _end - _start : lineEnd;
                if (_line.Length + take > MaxLineChars)
                    throw new DataFileException(path, $"line {number}: longer than {MaxLineChars} characters");
                _line.Append(_buffer, _start, take);
                _start += take;
                if (lineEnd < 0) continue;
                _afterCr = _buffer[_start++] == '\r';
                return _line.ToString();
            }
        }

        public void Dispose() => reader.Dispose();
    }

    /// <summary>A field as it appears in a message: short, and printable on one line (control characters escaped as \uXXXX).</summary>
    private static string Shown(ReadOnlySpan<char> field)
    {
        var shown = new StringBuilder();
        foreach (char c in field[..Math.Min(field.Length, 20)])
        {
            if (char.IsControl(c)) shown.Append(CultureInfo.InvariantCulture, $"\\u{(int)c:X4}");
            else shown.Append(c);
        }
        return field.Length > 20 ? shown.Append("...").ToString() : shown.ToString();
    }
}
