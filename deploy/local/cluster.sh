#!/usr/bin/env bash
# A local multi-process cluster: N silo processes on loopback, silo 0 the primary (localhost clustering).
# PIDs, logs and the cluster's settings live in a state folder so 'stop' and 'status' find them.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STATE=${BACKPROP_STATE:-$ROOT/deploy/local/state}

usage() {
  cat <<USAGE
usage: deploy/local/cluster.sh start [--silos N] [--silo-port P] [--gateway-port G] [--cluster-id ID] [--data-dir DIR]
       deploy/local/cluster.sh stop | status

start   builds the silo (Release) and starts N silos (default 3): silo i listens on P+i (default 11111+i)
        and serves clients on G+i (default 30000+i). Waits until every silo is up.
stop    stops the silos (SIGTERM, then SIGKILL after 15 s).
status  lists the silos and whether they run.
Env: BACKPROP_STATE (state folder, default deploy/local/state), BACKPROP_SILO_DLL (a built silo to run
instead of building one), BACKPROP_DATA (data directory).
USAGE
}

alive() { kill -0 "$1" 2>/dev/null; }

start() {
  local n=3 silo_port=11111 gateway_port=30000 cluster=backprop-dev data=${BACKPROP_DATA:-}
  while [ $# -gt 0 ]; do
    case $1 in
      --silos) n=$2; shift 2 ;;
      --silo-port) silo_port=$2; shift 2 ;;
      --gateway-port) gateway_port=$2; shift 2 ;;
      --cluster-id) cluster=$2; shift 2 ;;
      --data-dir) data=$2; shift 2 ;;
      -h|--help) usage; exit 0 ;;
      *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
  done
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "error: --silos must be a positive integer" >&2; exit 2; }
  if [ -f "$STATE/pids" ]; then
    while read -r pid; do
      if alive "$pid"; then echo "error: a cluster is already running (pid $pid); run '$0 stop' first" >&2; exit 2; fi
    done < "$STATE/pids"
  fi

  local dll=${BACKPROP_SILO_DLL:-}
  if [ -z "$dll" ]; then
    echo "building the silo (Release)..."
    dotnet build -c Release "$ROOT/src/Silo/Backprop.Silo.csproj" -v q -nologo >/dev/null
    dll=$ROOT/src/Silo/bin/Release/net10.0/Backprop.Silo.dll
  fi

  mkdir -p "$STATE"
  : > "$STATE/pids"
  printf 'CLUSTER_ID=%s\nGATEWAY=127.0.0.1:%s\nSILOS=%s\n' "$cluster" "$gateway_port" "$n" > "$STATE/cluster.env"
  for ((i = 0; i < n; i++)); do
    local args=(--cluster-id "$cluster" --silo-port $((silo_port + i)) --gateway-port $((gateway_port + i)) --name "silo-$i")
    [ "$i" -gt 0 ] && args+=(--primary "127.0.0.1:$silo_port")
    [ -n "$data" ] && args+=(--data-dir "$data")
    local log="$STATE/silo-$i.log"
    nohup dotnet "$dll" "${args[@]}" > "$log" 2>&1 < /dev/null &
    echo $! >> "$STATE/pids"
    # The primary must be up before the others join; each silo logs "silo-i up" when it serves.
    local waited=0
    until grep -q "silo-$i up" "$log" 2>/dev/null; do
      if ! alive "$!"; then echo "error: silo-$i exited; its log ($log) ends with:" >&2; tail -5 "$log" >&2; stop; exit 1; fi
      if [ $waited -ge 600 ]; then echo "error: silo-$i not up after 60 s; see $log" >&2; stop; exit 1; fi
      sleep 0.1; waited=$((waited + 1))
    done
    echo "silo-$i up: pid $!, silo port $((silo_port + i)), gateway 127.0.0.1:$((gateway_port + i)), log $log"
  done
  echo "cluster '$cluster' of $n silos; train on it with: dotnet run --project src/Client -- train --gateway 127.0.0.1:$gateway_port --cluster-id $cluster"
}

stop() {
  [ -f "$STATE/pids" ] || { echo "no cluster state in $STATE"; return 0; }
  local pids
  pids=$(cat "$STATE/pids")
  for pid in $pids; do alive "$pid" && kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < 150; t++)); do
    local any=0
    for pid in $pids; do alive "$pid" && any=1; done
    [ $any -eq 0 ] && break
    sleep 0.1
  done
  for pid in $pids; do alive "$pid" && { echo "silo pid $pid did not stop; killing it"; kill -KILL "$pid" 2>/dev/null || true; }; done
  rm -f "$STATE/pids"
  echo "stopped"
}

status() {
  [ -f "$STATE/pids" ] || { echo "no cluster running (no $STATE/pids)"; return 0; }
  cat "$STATE/cluster.env"
  local i=0
  while read -r pid; do
    if alive "$pid"; then echo "silo-$i pid $pid running"; else echo "silo-$i pid $pid not running"; fi
    i=$((i + 1))
  done < "$STATE/pids"
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
