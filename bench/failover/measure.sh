#!/usr/bin/env bash
# Time from `kill -9` of the silo that holds a run's coordinator and parameter server to the run's next
# applied step ("recovered" in the run's event log), with Redis and 3 silo processes from
# deploy/local/cluster.sh (Release), training pytorch-mlp on MNIST. Each round kills the current coordinator's
# silo, waits for the "recovered" event, and starts the silo again. Prints one line per round and the median.
#
#   bench/failover/measure.sh [ROUNDS]      (default 5; env BACKPROP_PROBE_TIMEOUT etc. reach the silos)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=${1:-5}
export BACKPROP_STATE=$(mktemp -d /tmp/failover-bench-XXXX)
SCRIPT="$ROOT/deploy/local/cluster.sh"
dotnet build -c Release "$ROOT/src/Client" -v q -nologo >/dev/null
CLI=(dotnet "$ROOT/src/Client/bin/Release/net10.0/backprop.dll")
SILO_PORT=$((20000 + RANDOM % 20000)); GATEWAY_PORT=$((SILO_PORT + 10)); REDIS_PORT=$((SILO_PORT + 20))
GATEWAYS="127.0.0.1:$GATEWAY_PORT,127.0.0.1:$((GATEWAY_PORT + 1)),127.0.0.1:$((GATEWAY_PORT + 2))"
TARGET=(--gateway "$GATEWAYS" --cluster-id failover-bench)
RUN=failover-$$

cleanup() { kill "${TRAIN_PID:-}" 2>/dev/null || true; bash "$SCRIPT" stop >/dev/null; rm -rf "$BACKPROP_STATE"; }
trap cleanup EXIT
bash "$SCRIPT" start --silos 3 --redis --redis-port $REDIS_PORT --silo-port $SILO_PORT --gateway-port $GATEWAY_PORT \
  --cluster-id failover-bench >/dev/null
"${CLI[@]}" train --preset pytorch-mlp --epochs 100 --run-id $RUN "${TARGET[@]}" > "$BACKPROP_STATE/train.log" 2>&1 &
TRAIN_PID=$!

status() { "${CLI[@]}" status $RUN --json "${TARGET[@]}" 2>/dev/null | grep '^{'; }
times=()
for ((round = 1; round <= ROUNDS; round++)); do
  until s=$(status) && [ "$(jq -r .state <<<"$s")" = running ] && [ "$(jq -r .step <<<"$s")" -gt 200 ]; do sleep 0.5; done
  coordinator=$(jq -r .coordinatorSilo <<<"$s")
  victim=$(( ${coordinator##*:} - SILO_PORT ))
  recovered_before=$(jq '[.events[] | select(.kind == "recovered")] | length' <<<"$s")
  killed_at=$(date +%s.%N)
  bash "$SCRIPT" kill $victim >/dev/null
  until s=$(status) && [ "$(jq '[.events[] | select(.kind == "recovered")] | length' <<<"$s")" -gt "$recovered_before" ]; do sleep 0.5; done
  recovered_at=$(date -d "$(jq -r '[.events[] | select(.kind == "recovered")] | last | .time' <<<"$s")" +%s.%N)
  seconds=$(echo "$recovered_at - $killed_at" | bc -l)
  times+=("$seconds")
  printf 'round %d: killed silo-%d (coordinator %s): next step applied after %.2f s (%s)\n' \
    $round $victim "$coordinator" "$seconds" "$(jq -r '[.events[] | select(.kind == "resumed")] | last | .message' <<<"$s")"
  bash "$SCRIPT" restart $victim >/dev/null
done
printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {printf "median of %d: %.2f s (min %.2f, max %.2f)\n", NR, (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2), a[1], a[NR]}'
