#!/usr/bin/env bash
# Packs what bench/device/run.sh needs on a machine without .NET or network into .device/bundle.tar.xz (git-ignored
# through .git/info/exclude): the .NET runtime of this machine, the Release bins of the CLI, the silo and the bench
# (native libraries for linux-x64 only, identical files hard-linked once) and MNIST from the CLI's data directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
dotnet build -c Release bench/Backprop.Bench -v q -nologo >/dev/null
dotnet_root=$(dirname "$(readlink -f "$(command -v dotnet)")")
data=${BACKPROP_DATA:-$HOME/.cache/backprop-distributed}
[ -f "$data/mnist/train-images-idx3-ubyte" ] || { echo "MNIST missing under $data (dotnet run --project src/Client -- data fetch mnist)" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/dotnet/shared" "$stage/data"
cp -a "$dotnet_root/dotnet" "$dotnet_root/host" "$stage/dotnet/"
cp -a "$dotnet_root/shared/Microsoft.NETCore.App" "$dotnet_root/shared/Microsoft.AspNetCore.App" "$stage/dotnet/shared/"
for d in src/Client/bin/Release/net10.0 src/Silo/bin/Release/net10.0 bench/Backprop.Bench/bin/Release/net10.0; do
  mkdir -p "$stage/bins/$d" && cp -a "$d/." "$stage/bins/$d/"
  [ -d "$stage/bins/$d/runtimes" ] && find "$stage/bins/$d/runtimes" -mindepth 1 -maxdepth 1 ! -name linux-x64 -exec rm -rf {} +
done
cp -a "$data/mnist" "$stage/data/"
# BASE=DIR (a worktree of another commit, built in Release): that build's own assemblies too, for an A/B (run.sh ab).
if [ -n "${BASE:-}" ]; then
  (cd "$BASE" && find src/Client/bin/Release/net10.0 src/Silo/bin/Release/net10.0 bench/Backprop.Bench/bin/Release/net10.0 -maxdepth 1 \
    \( -name 'Backprop*.dll' -o -name 'backprop.dll' \) -print0 | xargs -0 -I{} install -D {} "$stage/base/{}")
fi
python3 - "$stage/bins" <<'PY'
import hashlib, os, sys
seen = {}
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        p = os.path.join(root, f)
        h = hashlib.sha1(open(p, 'rb').read()).hexdigest()
        if h in seen: os.remove(p); os.link(seen[h], p)
        else: seen[h] = p
PY
mkdir -p .device .git/info
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
tar -C "$stage" -cf - . | xz -T0 -6 > .device/bundle.tar.xz
cp bench/device/run.sh .device/run.sh
ls -l .device/bundle.tar.xz
