#!/usr/bin/env bash
# The libtorch peer beside `train --preset fast-98`, RUNS times (default 3), each pair started on a quiet machine
# (1-minute load average under 0.8) and run back to back: the peer's 10 epochs of 784-512-10 Adam (training
# seconds, its --json lines), then fast-98's wall time from the process's start to its last epoch row printed.
# JSON lines on stdout, a summary (medians and the ratio) on stderr:
#   bench/TorchPeer/measure.sh [RUNS] > bench/results/torch-peer-$(date -u +%F).jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
dotnet build -c Release bench/TorchPeer >/dev/null
dotnet build -c Release src/Client >/dev/null
peer=bench/TorchPeer/bin/Release/net10.0/TorchPeer
client=src/Client/bin/Release/net10.0/backprop

load() { cut -d' ' -f1 /proc/loadavg; }
wait_quiet() {   # up to 20 minutes
  for _ in $(seq 240); do
    awk '{ exit !($1 < 0.8) }' /proc/loadavg && return 0
    sleep 5
  done
  echo "measure.sh: the load average stayed at or above 0.8 for 20 minutes ($(load)); no quiet run" >&2
  exit 1
}

peer_seconds=() fast_seconds=()
for run in $(seq "$runs"); do
  wait_quiet
  load_before=$(load)
  lines=$("$peer" --json --epochs 10 --threads 2 --layers 784,512,10 --batch 128 --lr 1e-3 --seed 1 | sed "s/^{/{\"run\":$run,/")
  echo "$lines"
  peer_seconds+=("$(tail -1 <<<"$lines" | sed 's/.*"cumulativeTrainSeconds":\([0-9.]*\).*/\1/')")
  load_between=$(load)

  # Each stdout line stamped as it arrives; the figure is the stamp of the last epoch row.
  start=$EPOCHREALTIME
  rows=$("$client" train --preset fast-98 --no-progress | while IFS= read -r line; do
    [[ $line =~ ^\ *[0-9]+\ +[0-9.]+\ +[0-9.]+\ +[0-9.]+% ]] && echo "$EPOCHREALTIME $line"
  done)
  load_after=$(load)
  row=$(tail -1 <<<"$rows")
  seconds=$(awk -v s="$start" '{ printf "%.2f", $1 - s }' <<<"$row")
  epochs=$(awk '{ print $2 }' <<<"$row")
  accuracy=$(awk '{ sub("%", "", $5); print $5 }' <<<"$row")
  first98=$(awk '{ a = $5; sub("%", "", a); if (a + 0 >= 98) { print $2; exit } }' <<<"$rows")
  fast_seconds+=("$seconds")
  echo "{\"run\":$run,\"what\":\"fast-98\",\"secondsToLastEpochRow\":$seconds,\"epochs\":$epochs,\"lastAccuracy\":$accuracy,\"firstEpochAt98\":${first98:-null},\"loadBefore\":$load_before,\"loadBetween\":$load_between,\"loadAfter\":$load_after}"
done

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
p=$(median "${peer_seconds[@]}") f=$(median "${fast_seconds[@]}")
echo "libtorch 10 epochs: ${peer_seconds[*]} s (median $p); fast-98: ${fast_seconds[*]} s (median $f); ratio $(awk -v f="$f" -v p="$p" 'BEGIN { printf "%.2f", f / p }')" >&2
