#!/bin/bash
# On the lent machine (the device tool, `carry: [".device"]`, command `bash .device/run.sh weak` or `... cluster`): unpacks the bundle of
# bench/device/bundle.sh and runs the cluster benchmarks there, each bounded; rows and logs under $OUT.
set -u
start=$(date +%s)
mkdir -p /tmp/b && tar -C /tmp/b -xJf .device/bundle.tar.xz || { echo "unpack failed"; exit 1; }
export DOTNET_ROOT=/tmp/b/dotnet PATH=/tmp/b/dotnet:$PATH DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
cp -a /tmp/b/bins/. . && mkdir -p ~/.cache/backprop-distributed && cp -a /tmp/b/data/mnist ~/.cache/backprop-distributed/
echo "nproc $(nproc)"; lscpu | grep -E "Model name"; grep -o -w -E "avx512f|avx2" /proc/cpuinfo | sort | uniq -c
B="dotnet bench/Backprop.Bench/bin/Release/net10.0/Backprop.Bench.dll"
step() { local name=$1 limit=$2; shift 2; local t=$(date +%s); timeout "$limit" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.err"; echo "$name: rc $? in $(( $(date +%s) - t )) s"; tail -1 "$OUT/$name.err"; }
# Parts, one call each (a call may run 10 minutes): `bash .device/run.sh weak`, `... cluster`, `... ab` (an A/B, see below).
part=${1:-cluster}
if [ "$part" = cluster ]; then
step wire 60 $B wire --json
step cluster 300 $B cluster --epochs 5 --rounds 2 --json
elif [ "$part" = ab ]; then
# The commit of the bundle against BASE's assemblies (bundle.sh with BASE=DIR), taking turns: 8 silo processes,
# 784-1024-1024-10, one chunk of 256 per worker (the whole sum is written while the last phase of the backprop runs).
mkdir -p /tmp/baseroot && cp -a Backprop.Distributed.sln deploy /tmp/baseroot/ && cp -a /tmp/b/bins/. /tmp/baseroot/ && cp -a /tmp/b/base/. /tmp/baseroot/
here=$(pwd)
for r in 1 2; do
  for v in base head; do
    cd "$here"; [ $v = base ] && cd /tmp/baseroot
    step ab-$v-$r 150 $B cluster --modes core,processes --model 784,1024,1024,10 --workers 8 --server-shards 8 --batch 2048 --chunk 256 \
      --train-limit 40960 --epochs 3 --rounds 1 --json
  done
done
cd "$here"
else
# Weak scaling of 784-1024-1024-10 on silo processes: 256 samples per worker a step (chunks of 64), 20 steps an epoch.
for n in 1 2 4 8; do
  shards=$n; [ $n -ge 4 ] && shards=1,$n
  step weak$n 150 $B cluster --modes core,processes --model 784,1024,1024,10 --workers $n --server-shards $shards \
    --batch $((256 * n)) --chunk 64 --train-limit $((5120 * n)) --epochs 3 --rounds 1 --json
done
fi
echo "total $(( $(date +%s) - start )) s"
