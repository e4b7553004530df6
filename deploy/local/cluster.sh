#!/usr/bin/env bash
# A local multi-process cluster: N silo processes on loopback, clustered either around silo 0 (localhost
# clustering, the default) or through a Redis started here (--redis).
# Each silo is configured only through the environment variables a container gets (BACKPROP_ROLE, BACKPROP_HOST,
# BACKPROP_SILO_PORT, ...), so this runs the topology of the deploy manifests as processes.
# PIDs, logs, each silo's environment and the cluster's settings live in a state folder so that 'stop',
# 'status', 'kill', 'term', 'restart' and 'add' find them; with --redis, Redis' append-only file lives there too.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STATE=${BACKPROP_STATE:-$ROOT/deploy/local/state}

usage() {
  cat <<USAGE
usage: deploy/local/cluster.sh start [--silos N | --servers S --workers N] [--distinct-addresses] [--silo-port P]
                                     [--gateway-port G] [--http-port H] [--cluster-id ID] [--data-dir DIR]
                                     [--redis [--redis-port R]] [--tls [--tls-peer-name NAME]]
       deploy/local/cluster.sh stop | status | kill I | term I | restart I | add server|worker|all

start    builds the silo (Release) and starts N silos of role all (default 3), or S server silos (run
         coordinators, parameter servers) then N worker silos: silo i listens on P+i (default 11111+i),
         serves clients on G+i (default 30000+i) and, with --http-port, /healthz and /readyz on H+i.
         --distinct-addresses: silo i binds 127.0.0.(i+2) instead, with the same ports P, G, H for every
         silo, as separate machines would. Waits until every silo is up.
         Without --redis: localhost clustering around silo 0 (the primary). For quick experiments on one
         machine: the primary is a single point of failure and runs live in silo memory.
         With --redis: starts redis-server on 127.0.0.1:R (default 6379, append-only file in
         STATE/redis) and clusters the silos through it: membership, grain storage and reminders are in
         Redis, any silo may die, and a later 'start --redis' on the same state folder finds the runs again.
         Redis requires the password in STATE/redis.password (made once, readable by this user only);
         silos and cluster.env name the file (BACKPROP_REDIS_PASSWORD_FILE), never the password.
         With --tls: silo-to-silo and client connections use TLS with mutual authentication, with the
         development certificates of make-dev-certs.sh in STATE/certs (made when missing); cluster.env
         lists the client certificate, key and CA the CLI must be given (--tls-cert/--tls-key/--tls-ca).
         --tls-peer-name NAME (implies --tls): silos and the CLI check that a silo's certificate carries the
         DNS name NAME (as in Kubernetes, where pod IPs change) instead of the address dialled; certificates
         made here get NAME (BACKPROP_CERT_NAME of make-dev-certs.sh).
stop     stops the silos (SIGTERM, then SIGKILL after 15 s), then Redis (which writes its append-only file).
status   lists the silos (and Redis) and whether they run.
kill I   kills silo I with SIGKILL (no goodbye: the others must detect its death).
term I   stops silo I with SIGTERM (it leaves the cluster cleanly) and waits until it has exited.
restart  starts silo I again with the environment it was started with.
add R    starts one more silo of role R in the running cluster (the next index, same settings).
Env: BACKPROP_STATE (state folder, default deploy/local/state), BACKPROP_SILO_DLL (a built silo to run
instead of building one), BACKPROP_DATA (data directory).
USAGE
}

# Running, not a zombie: a killed silo whose starter (this script) has exited may wait unreaped for a while
# where nothing reaps orphans (containers, test hosts), and kill -0 still succeeds on it.
alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $state != Z* ]]
}
now() { date +%H:%M:%S.%3N; }

silo_dll() {
  local dll=${BACKPROP_SILO_DLL:-}
  if [ -z "$dll" ]; then
    echo "building the silo (Release)..." >&2
    dotnet build -c Release "$ROOT/src/Silo/Backprop.Silo.csproj" -v q -nologo >/dev/null
    dll=$ROOT/src/Silo/bin/Release/net10.0/Backprop.Silo.dll
  fi
  echo "$dll"
}

# The environment of silo I with role R, from the cluster's settings (CLUSTER_ID, REDIS, ... in STATE/cluster.env).
silo_env() {
  local i=$1 role=$2 host=127.0.0.1 silo=$((SILO_PORT + i)) gateway=$((GATEWAY_PORT + i)) http=0
  [ "$HTTP_PORT" -gt 0 ] && http=$((HTTP_PORT + i))
  if [ "$DISTINCT" = 1 ]; then host=127.0.0.$((i + 2)); silo=$SILO_PORT; gateway=$GATEWAY_PORT; http=$HTTP_PORT; fi
  echo "BACKPROP_ROLE=$role"
  echo "BACKPROP_HOST=$host"
  echo "BACKPROP_CLUSTER_ID=$CLUSTER_ID"
  echo "BACKPROP_SILO_PORT=$silo"
  echo "BACKPROP_GATEWAY_PORT=$gateway"
  echo "BACKPROP_HTTP_PORT=$http"
  echo "BACKPROP_HTTP_BIND=$host"
  echo "BACKPROP_SILO_NAME=silo-$i"
  if [ -n "$REDIS" ]; then
    echo "BACKPROP_REDIS=$REDIS"
    echo "BACKPROP_REDIS_PASSWORD_FILE=$STATE/redis.password"
  elif [ "$i" -gt 0 ]; then
    # Localhost clustering: silo 0 is the primary.
    if [ "$DISTINCT" = 1 ]; then echo "BACKPROP_PRIMARY=127.0.0.2:$SILO_PORT"; else echo "BACKPROP_PRIMARY=127.0.0.1:$SILO_PORT"; fi
  fi
  [ -n "$DATA" ] && echo "BACKPROP_DATA=$DATA"
  # Retention of finished runs, when the caller sets it (bench soak does).
  [ -n "${BACKPROP_KEEP_FINISHED_RUNS:-}" ] && echo "BACKPROP_KEEP_FINISHED_RUNS=$BACKPROP_KEEP_FINISHED_RUNS"
  [ -n "${BACKPROP_KEEP_FINISHED_DAYS:-}" ] && echo "BACKPROP_KEEP_FINISHED_DAYS=$BACKPROP_KEEP_FINISHED_DAYS"
  [ -n "${BACKPROP_KEEP_FINISHED_MIN_AGE:-}" ] && echo "BACKPROP_KEEP_FINISHED_MIN_AGE=$BACKPROP_KEEP_FINISHED_MIN_AGE"
  if [ -n "${TLS:-}" ]; then
    echo "BACKPROP_TLS_CERT=$TLS/silo.pem"
    echo "BACKPROP_TLS_KEY=$TLS/silo.key"
    echo "BACKPROP_TLS_CA=$TLS/ca.pem"
    [ -n "${TLS_PEER_NAME:-}" ] && echo "BACKPROP_TLS_PEER_NAME=$TLS_PEER_NAME"
  fi
  echo "GATEWAY=$host:$gateway"
}

# How many times silo I has logged that it is up.
ups() { local c; c=$(grep -c "silo-$1 up" "$STATE/silo-$1.log" 2>/dev/null) || true; echo "${c:-0}"; }

# The pid of silo I (line I of STATE/pids), or nothing.
silo_pid() { sed -n "$(($1 + 1))p" "$STATE/pids" 2>/dev/null; }

# Starts silo I with its stored environment (one VAR=value a line, STATE/silo-I.env; GATEWAY is for this
# script) and waits until it logs "silo-I up" once more than before. Appends to its log, so a restart keeps
# the history of a kill.
launch() {
  local i=$1 dll=$2
  local log="$STATE/silo-$i.log"
  local vars=()
  mapfile -t vars < <(grep '^BACKPROP_' "$STATE/silo-$i.env")
  local before
  before=$(ups "$i")
  nohup env "${vars[@]}" dotnet "$dll" >> "$log" 2>&1 < /dev/null &
  local pid=$!
  # Line i of the pids file is silo i's pid.
  local pids=()
  [ -f "$STATE/pids" ] && mapfile -t pids < "$STATE/pids"
  pids[i]=$pid
  printf '%s\n' "${pids[@]}" > "$STATE/pids"
  local waited=0
  until [ "$(ups "$i")" -gt "$before" ]; do
    if ! alive "$pid"; then echo "error: silo-$i exited; its log ($log) ends with:" >&2; tail -5 "$log" >&2; return 1; fi
    if [ $waited -ge 600 ]; then echo "error: silo-$i not up after 60 s; see $log" >&2; return 1; fi
    sleep 0.1; waited=$((waited + 1))
  done
  echo "silo-$i up: pid $pid, $(grep "silo-$i up" "$log" | tail -1 | sed -E 's/.* up: //'), log $log"
}

# redis-cli with the cluster's password (REDISCLI_AUTH: not on its command line).
redis_cli() { REDISCLI_AUTH=$(cat "$STATE/redis.password") redis-cli "$@"; }

start_redis() {
  local port=$1
  command -v redis-server >/dev/null || { echo "error: redis-server is not installed (apt-get install -y redis-server)" >&2; return 1; }
  mkdir -p "$STATE/redis"
  # AUTH: a password made once per state folder (kept, like Redis' data, across stops), readable by this user only.
  if [ ! -s "$STATE/redis.password" ]; then
    (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$STATE/redis.password")
  fi
  # Loopback only; the append-only file (fsync every second) is what makes runs survive a stop. The password goes
  # in as configuration on stdin ('-'), not as an argument that ps would show.
  printf 'requirepass %s\n' "$(cat "$STATE/redis.password")" | nohup redis-server - --bind 127.0.0.1 --port "$port" \
    --appendonly yes --dir "$STATE/redis" --save '' > "$STATE/redis.log" 2>&1 &
  echo $! > "$STATE/redis.pid"
  local waited=0
  until [ "$(redis_cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; do
    if ! alive "$(cat "$STATE/redis.pid")"; then echo "error: redis-server exited; $STATE/redis.log ends with:" >&2; tail -5 "$STATE/redis.log" >&2; return 1; fi
    if [ $waited -ge 300 ]; then echo "error: redis-server not answering after 30 s" >&2; return 1; fi
    sleep 0.1; waited=$((waited + 1))
  done
  echo "redis up: pid $(cat "$STATE/redis.pid"), 127.0.0.1:$port, data $STATE/redis, password in $STATE/redis.password"
}

start() {
  local n=3 silo_port=11111 gateway_port=30000 http_port=0 cluster=backprop-dev data=${BACKPROP_DATA:-} redis=0 redis_port=6379
  local servers="" workers="" distinct=0 tls=0 peer_name=""
  while [ $# -gt 0 ]; do
    case $1 in
      --silos) n=$2; shift 2 ;;
      --servers) servers=$2; shift 2 ;;
      --workers) workers=$2; shift 2 ;;
      --distinct-addresses) distinct=1; shift ;;
      --http-port) http_port=$2; shift 2 ;;
      --silo-port) silo_port=$2; shift 2 ;;
      --gateway-port) gateway_port=$2; shift 2 ;;
      --cluster-id) cluster=$2; shift 2 ;;
      --data-dir) data=$2; shift 2 ;;
      --redis) redis=1; shift ;;
      --redis-port) redis_port=$2; shift 2 ;;
      --tls) tls=1; shift ;;
      --tls-peer-name) tls=1; peer_name=$2; shift 2 ;;
      -h|--help) usage; exit 0 ;;
      *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
  done
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "error: --silos must be a positive integer" >&2; exit 2; }
  local roles=()
  if [ -n "$servers$workers" ]; then
    [[ $servers =~ ^[1-9][0-9]*$ && $workers =~ ^[1-9][0-9]*$ ]] || { echo "error: --servers and --workers go together, each a positive integer" >&2; exit 2; }
    for ((i = 0; i < servers; i++)); do roles+=(server); done
    for ((i = 0; i < workers; i++)); do roles+=(worker); done
  else
    for ((i = 0; i < n; i++)); do roles+=(all); done
  fi
  n=${#roles[@]}
  [ "$distinct" = 1 ] && [ "$n" -gt 253 ] && { echo "error: --distinct-addresses: at most 253 silos (127.0.0.2-254)" >&2; exit 2; }
  [[ $http_port =~ ^[0-9]+$ ]] || { echo "error: --http-port must be a port number" >&2; exit 2; }
  [[ $redis_port =~ ^[1-9][0-9]*$ ]] || { echo "error: --redis-port must be a port number" >&2; exit 2; }
  if [ -f "$STATE/pids" ]; then
    while read -r pid; do
      if [ -n "$pid" ] && alive "$pid"; then echo "error: a cluster is already running (pid $pid); run '$0 stop' first" >&2; exit 2; fi
    done < "$STATE/pids"
  fi

  local dll
  dll=$(silo_dll)
  mkdir -p "$STATE"
  rm -f "$STATE/pids" "$STATE/redis.pid"
  local i redis_address=""
  if [ $redis -eq 1 ]; then
    redis_address=127.0.0.1:$redis_port
    start_redis "$redis_port" || { stop; exit 1; }
  fi
  rm -f "$STATE"/silo-*.env
  TLS="" TLS_PEER_NAME=$peer_name
  if [ $tls -eq 1 ]; then
    TLS=$STATE/certs
    BACKPROP_CERT_NAME=${peer_name:-backprop-silo} "$ROOT/deploy/local/make-dev-certs.sh" "$TLS" >/dev/null || { stop; exit 1; }
  fi
  CLUSTER_ID=$cluster REDIS=$redis_address SILO_PORT=$silo_port GATEWAY_PORT=$gateway_port HTTP_PORT=$http_port DISTINCT=$distinct DATA=$data
  for ((i = 0; i < n; i++)); do silo_env "$i" "${roles[$i]}" > "$STATE/silo-$i.env"; done
  write_settings
  local gateway_list
  gateway_list=$(sed -n 's/^GATEWAYS=//p' "$STATE/cluster.env")
  for ((i = 0; i < n; i++)); do
    # One at a time: with localhost clustering the primary must be up before the others join.
    launch "$i" "$dll" || { stop; exit 1; }
  done
  if [ $redis -eq 1 ]; then
    echo "cluster '$cluster' of $n silos on Redis $redis_address; train on it with: dotnet run --project src/Client -- train --redis $redis_address --redis-password-file $STATE/redis.password --cluster-id $cluster"
  else
    echo "cluster '$cluster' of $n silos; train on it with: dotnet run --project src/Client -- train --gateway $gateway_list --cluster-id $cluster"
  fi
  if [ -n "$TLS" ]; then echo "TLS required: add --tls-cert $TLS/client.pem --tls-key $TLS/client.key --tls-ca $TLS/ca.pem${TLS_PEER_NAME:+ --tls-peer-name $TLS_PEER_NAME}"; fi
}

# The cluster's settings, for status, the CLI and 'add'; the gateways are those of every silo started so far.
write_settings() {
  local gateway_list count
  gateway_list=$(cat "$STATE"/silo-*.env | sed -n 's/^GATEWAY=//p' | paste -sd, -)
  count=$(ls "$STATE"/silo-*.env | wc -l)
  printf 'CLUSTER_ID=%s\nGATEWAYS=%s\nREDIS=%s\nSILOS=%s\nSILO_PORT=%s\nGATEWAY_PORT=%s\nHTTP_PORT=%s\nDISTINCT=%s\nDATA=%s\nTLS=%s\nTLS_PEER_NAME=%s\n' \
    "$CLUSTER_ID" "$gateway_list" "$REDIS" "$count" "$SILO_PORT" "$GATEWAY_PORT" "$HTTP_PORT" "$DISTINCT" "$DATA" "${TLS:-}" "${TLS_PEER_NAME:-}" > "$STATE/cluster.env"
  # What the CLI needs (as flags or as these environment variables) to be let in.
  [ -n "${TLS:-}" ] && printf 'BACKPROP_TLS_CERT=%s\nBACKPROP_TLS_KEY=%s\nBACKPROP_TLS_CA=%s\n' "$TLS/client.pem" "$TLS/client.key" "$TLS/ca.pem" >> "$STATE/cluster.env"
  [ -n "${TLS_PEER_NAME:-}" ] && echo "BACKPROP_TLS_PEER_NAME=$TLS_PEER_NAME" >> "$STATE/cluster.env"
  [ -n "$REDIS" ] && echo "BACKPROP_REDIS_PASSWORD_FILE=$STATE/redis.password" >> "$STATE/cluster.env"
  return 0
}

add_silo() {
  local role=${1:-}
  [[ $role =~ ^(server|worker|all)$ ]] || { echo "error: add: role must be server, worker or all" >&2; exit 2; }
  [ -f "$STATE/cluster.env" ] && [ -f "$STATE/pids" ] || { echo "error: no cluster running in $STATE" >&2; exit 2; }
  # shellcheck disable=SC1091
  source "$STATE/cluster.env"
  local i
  i=$(ls "$STATE"/silo-*.env | wc -l)
  [ "$DISTINCT" = 1 ] && [ "$i" -gt 252 ] && { echo "error: no loopback address left" >&2; exit 2; }
  silo_env "$i" "$role" > "$STATE/silo-$i.env"
  write_settings
  launch "$i" "$(silo_dll)"
}

stop_pids() {
  local pids=("$@")
  for pid in "${pids[@]}"; do alive "$pid" && kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < 150; t++)); do
    local any=0
    for pid in "${pids[@]}"; do alive "$pid" && any=1; done
    [ $any -eq 0 ] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do alive "$pid" && { echo "pid $pid did not stop; killing it"; kill -KILL "$pid" 2>/dev/null || true; }; done
  return 0
}

stop() {
  if [ ! -f "$STATE/pids" ] && [ ! -f "$STATE/redis.pid" ]; then echo "no cluster state in $STATE"; return 0; fi
  if [ -f "$STATE/pids" ]; then
    local pids=()
    mapfile -t pids < <(grep -v '^$' "$STATE/pids")
    [ ${#pids[@]} -gt 0 ] && stop_pids "${pids[@]}"
    rm -f "$STATE/pids"
  fi
  # Redis last: silos leave the membership table as they stop. SIGTERM makes redis-server flush its AOF.
  if [ -f "$STATE/redis.pid" ]; then
    stop_pids "$(cat "$STATE/redis.pid")"
    rm -f "$STATE/redis.pid"
  fi
  echo "stopped"
}

status() {
  [ -f "$STATE/pids" ] || { echo "no cluster running (no $STATE/pids)"; return 0; }
  cat "$STATE/cluster.env"
  if [ -f "$STATE/redis.pid" ]; then
    local redis_address
    redis_address=$(sed -n 's/^REDIS=//p' "$STATE/cluster.env")
    if alive "$(cat "$STATE/redis.pid")"; then
      echo "redis pid $(cat "$STATE/redis.pid") running on $redis_address ($(redis_cli -h "${redis_address%:*}" -p "${redis_address##*:}" ping 2>&1))"
    else
      echo "redis pid $(cat "$STATE/redis.pid") not running"
    fi
  fi
  local i=0
  while read -r pid; do
    if [ -n "$pid" ] && alive "$pid"; then echo "silo-$i pid $pid running"; else echo "silo-$i pid $pid not running"; fi
    i=$((i + 1))
  done < "$STATE/pids"
}

check_index() {
  [[ ${1:-} =~ ^[0-9]+$ ]] && [ -f "$STATE/silo-$1.env" ] || { echo "error: no silo '${1:-}' in $STATE" >&2; exit 2; }
}

term_silo() {
  check_index "${1:-}"
  local pid
  pid=$(silo_pid "$1")
  if [ -z "$pid" ] || ! alive "$pid"; then echo "silo-$1 is not running"; return 0; fi
  local t=$(now)
  kill -TERM "$pid"
  local waited=0
  while alive "$pid"; do
    if [ $waited -ge 600 ]; then echo "error: silo-$1 (pid $pid) still running 60 s after SIGTERM" >&2; return 1; fi
    sleep 0.1; waited=$((waited + 1))
  done
  echo "$t silo-$1 terminated (pid $pid), exited by $(now)"
}

kill_silo() {
  check_index "${1:-}"
  local pid
  pid=$(silo_pid "$1")
  if [ -z "$pid" ] || ! alive "$pid"; then echo "silo-$1 is not running"; return 0; fi
  kill -KILL "$pid"
  local t=$(now)
  while alive "$pid"; do sleep 0.05; done
  echo "$t silo-$1 killed (pid $pid)"
}

restart_silo() {
  check_index "${1:-}"
  local pid
  pid=$(silo_pid "$1")
  if [ -n "$pid" ] && alive "$pid"; then echo "error: silo-$1 is running (pid $pid)" >&2; exit 2; fi
  launch "$1" "$(silo_dll)"
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  kill) kill_silo "${2:-}" ;;
  term) term_silo "${2:-}" ;;
  add) add_silo "${2:-}" ;;
  restart) restart_silo "${2:-}" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
