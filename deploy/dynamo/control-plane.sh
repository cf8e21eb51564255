#!/usr/bin/env bash
# etcd + NATS (with JetStream) for the head node of a Dynamo deployment (seed 002), without
# containers: Debian's `etcd` and `nats-server` binaries, run in the background with their data,
# logs and pids in one directory. `deploy/dynamo/compose.yaml` is the same pair as containers.
#
#   deploy/dynamo/control-plane.sh start  [--host ADDR] [--dir DIR] [--install]
#   deploy/dynamo/control-plane.sh status [--dir DIR]
#   deploy/dynamo/control-plane.sh stop   [--dir DIR]
#
# --host is the address workers and the frontend on other nodes reach (default 127.0.0.1: one
# machine only). Ports come from ETCD_PORT (2379), ETCD_PEER_PORT (2380, loopback: a single-member
# cluster), NATS_PORT (4222) and NATS_MONITOR_PORT (8222). `start` returns once etcd's /health
# and NATS's /healthz answer, then prints the ETCD_ENDPOINTS and NATS_SERVER lines to export on
# every node; it refuses to start over a pair that is still running from the same directory.
set -euo pipefail

usage() { sed -n '6,8p' "$0" | sed 's/^# *//' >&2; exit 2; }
[ $# -ge 1 ] || usage
action=$1; shift
host=127.0.0.1
dir=${MESHSERVE_CONTROL_PLANE_DIR:-$HOME/.cache/meshserve/control-plane}
install=0
while [ $# -gt 0 ]; do
  case $1 in
    --host) host=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --install) install=1; shift ;;
    *) echo "control-plane.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
etcd_port=${ETCD_PORT:-2379}
etcd_peer_port=${ETCD_PEER_PORT:-2380}
nats_port=${NATS_PORT:-4222}
nats_monitor_port=${NATS_MONITOR_PORT:-8222}
services=(etcd nats)

running() {  # running NAME: its pid file names a live process
  local pid
  pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null
}

# An HTTP GET whose body must contain $2; python3 because meshserve's nodes always have it.
answers() {
  python3 - "$1" "$2" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.exit(0 if sys.argv[2] in response.read().decode() else 1)
PY
}

start() {
  for name in "${services[@]}"; do
    if running "$name"; then
      echo "control-plane.sh: $name is already running from $dir (pid $(cat "$dir/$name.pid")); stop it first" >&2
      exit 1
    fi
  done
  if [ "$install" = 1 ]; then
    as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server nats-server
  fi
  for binary in etcd nats-server; do
    command -v "$binary" >/dev/null || {
      echo "control-plane.sh: '$binary' is not installed (Debian: apt-get install etcd-server nats-server, or pass --install)" >&2
      exit 1
    }
  done
  mkdir -p "$dir/etcd-data" "$dir/nats-store"
  nohup etcd --name meshserve-head --data-dir "$dir/etcd-data" \
    --listen-client-urls "http://$host:$etcd_port" --advertise-client-urls "http://$host:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "meshserve-head=http://127.0.0.1:$etcd_peer_port" \
    >"$dir/etcd.log" 2>&1 </dev/null &
  echo $! >"$dir/etcd.pid"
  nohup nats-server -a "$host" -p "$nats_port" -m "$nats_monitor_port" -js -sd "$dir/nats-store" \
    >"$dir/nats.log" 2>&1 </dev/null &
  echo $! >"$dir/nats.pid"

  local deadline=$((SECONDS + 30))
  until answers "http://$host:$etcd_port/health" '"health":"true"' &&
        answers "http://$host:$nats_monitor_port/healthz" '"ok"'; do
    for name in "${services[@]}"; do
      running "$name" || { echo "control-plane.sh: $name exited; its log:" >&2; tail -20 "$dir/$name.log" >&2; stop; exit 1; }
    done
    if [ $SECONDS -ge $deadline ]; then
      echo "control-plane.sh: etcd or NATS not healthy after 30 s; logs in $dir" >&2
      stop; exit 1
    fi
    sleep 0.3
  done
  echo "etcd and NATS are up (data, logs and pids in $dir). On every node:"
  echo "export ETCD_ENDPOINTS=http://$host:$etcd_port"
  echo "export NATS_SERVER=nats://$host:$nats_port"
}

stop() {
  local name pid
  for name in "${services[@]}"; do
    running "$name" || { rm -f "$dir/$name.pid"; continue; }
    pid=$(cat "$dir/$name.pid")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$dir/$name.pid"
    echo "stopped $name (pid $pid)"
  done
}

status() {
  local name code=0
  for name in "${services[@]}"; do
    if running "$name"; then echo "$name: running (pid $(cat "$dir/$name.pid"))"; else echo "$name: stopped"; code=3; fi
  done
  return $code
}

case $action in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
