#!/bin/bash
# On the lent machine (the device tool, `carry: [".device"]`, command `bash .device/run.sh`): unpacks the bundle of
# bench/device/bundle.sh and runs the cluster benchmarks there, each bounded; rows and logs under $OUT.
set -u
start=$(date +%s)
mkdir -p /tmp/b && tar -C /tmp/b -xJf .device/bundle.tar.xz || { echo "unpack failed"; exit 1; }
export DOTNET_ROOT=/tmp/b/dotnet PATH=/tmp/b/dotnet:$PATH DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
cp -a /tmp/b/bins/. . && mkdir -p ~/.cache/backprop-distributed && cp -a /tmp/b/data/mnist ~/.cache/backprop-distributed/
echo "nproc $(nproc)"; lscpu | grep -E "Model name"; grep -o -w -E "avx512f|avx2" /proc/cpuinfo | sort | uniq -c
B="dotnet bench/Backprop.Bench/bin/Release/net10.0/Backprop.Bench.dll"
step() { local name=$1 limit=$2; shift 2; local t=$(date +%s); timeout "$limit" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.err"; echo "$name: rc $? in $(( $(date +%s) - t )) s"; tail -1 "$OUT/$name.err"; }
step wire 60 $B wire --json
step cluster 220 $B cluster --epochs 5 --rounds 2 --json
step cluster4 120 $B cluster --modes core,processes --workers 4 --batch 256 --epochs 5 --rounds 1 --json
step big2 150 $B cluster --modes core,processes --model 784,1024,1024,10 --batch 256 --train-limit 12000 --workers 2 --epochs 3 --rounds 1 --json
step big4 150 $B cluster --modes core,processes --model 784,1024,1024,10 --batch 256 --train-limit 12000 --workers 4 --epochs 3 --rounds 1 --json
echo "total $(( $(date +%s) - start )) s"
