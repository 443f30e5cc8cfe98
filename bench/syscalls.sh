#!/usr/bin/env bash
# System calls, context switches and CPU time per round trip of the relay or the floor pipe,
# counted by `perf stat` (kernel tracepoints and software counters, which work in a VM where
# hardware counters do not) over the throughput scenario's measured window.
#
#   bash bench/syscalls.sh relay tokio       # or: relay smol, floor tokio, floor smol
#   EV=syscalls:sys_enter_recvfrom,task-clock bash bench/syscalls.sh floor smol
#
# Counts per round trip hold on a loaded machine; CPU time per round trip roughly does; the
# round trips per second it prints do not.
set -euo pipefail
cd "$(dirname "$0")/.."

KIND=${1:?relay or floor}
RT=${2:-tokio}
SERVERS=${SERVERS:-1000}
WARMUP=${WARMUP:-2}
DURATION=${DURATION:-4}
PORT=${PORT:-18590}
EV=${EV:-raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_ctl,context-switches,task-clock}
OUTDIR=${OUTDIR:-target/syscalls}

cargo build --release -q -p switchyard -p switchyard-bench
mkdir -p "$OUTDIR"
out="$OUTDIR/$KIND-$RT.csv"
rm -f "$out"

case "$KIND" in
  relay)
    target/release/switchyard --runtime "$RT" --workers 1 --listen "127.0.0.1:$PORT" \
      --metrics-listen "" --rate-burst 1000000 --max-connections 2000000 \
      --max-connections-per-ip 1000000 --ping-interval 5s >/dev/null 2>&1 &
    raw=() ;;
  floor)
    target/release/switchyard-bench floor --listen "127.0.0.1:$PORT" --threads 1 --runtime "$RT" \
      >/dev/null 2>&1 &
    raw=(--raw) ;;
  *) echo "relay or floor" >&2; exit 2 ;;
esac
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
sleep 0.5

json=$(target/release/switchyard-bench throughput "${raw[@]}" --addr "127.0.0.1:$PORT" \
  --servers "$SERVERS" --phones 1 --warmup "$WARMUP" --duration "$DURATION" --target "$KIND-$RT" \
  2> >(while read -r line; do
    case "$line" in
      "measure: start") perf stat -x, -e "$EV" -p "$PID" -o "$out" & echo $! >"$OUTDIR/perf.pid" ;;
      "measure: end") kill -INT "$(cat "$OUTDIR/perf.pid")" ;;
    esac
  done) | tail -1)
sleep 1

python3 - "$json" "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
n = r["round_trips"]
print(f"{r['target']}: {n:,} round trips, {r['round_trips_per_s']:,.0f}/s (rough)")
for line in open(sys.argv[2]):
    p = line.strip().split(",")
    if len(p) > 3 and p[0] and p[0][0].isdigit():
        us = "clock" in p[2]
        value = float(p[0]) / n * (1000 if us else 1)
        print(f"  {p[2] + (' (µs)' if us else ''):40s} {value:8.2f} per round trip")
PY
