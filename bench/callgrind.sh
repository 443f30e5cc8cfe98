#!/usr/bin/env bash
# Instructions per round trip of the relay or the floor pipe, counted by valgrind's callgrind:
# repeatable whatever else the machine is doing, unlike round trips per second.
#
#   bash bench/callgrind.sh relay tokio      # or: relay smol, floor tokio, floor smol
#   SERVERS=200 DURATION=8 bash bench/callgrind.sh floor smol
#
# The target runs under callgrind with one worker; the load generator runs the closed-loop
# throughput scenario (N × 1, no profiler) and marks its measured window on stderr, where this
# script zeroes the counts and dumps them. Prints the total, the round trips in the window and
# their ratio, and leaves the dump (for callgrind_annotate) in $OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/.."

KIND=${1:?relay or floor}
RT=${2:-tokio}
SERVERS=${SERVERS:-200}
SIZE=${SIZE:-64}
WARMUP=${WARMUP:-3}
DURATION=${DURATION:-8}
PORT=${PORT:-18580}
OUTDIR=${OUTDIR:-target/callgrind}
RELAY=${RELAY:-target/release/switchyard}  # another build, for a before/after

cargo build --release -q -p switchyard -p switchyard-bench
mkdir -p "$OUTDIR"
out="$OUTDIR/$KIND-$RT${TAG:+-$TAG}.out"
rm -f "$out" "$out".*

case "$KIND" in
  relay)
    cmd=("$RELAY" --runtime "$RT" --workers 1 --listen "127.0.0.1:$PORT"
      --metrics-listen "" --rate-burst 1000000 --max-connections 2000000
      --max-connections-per-ip 1000000 --ping-interval 5s)
    raw=() ;;
  floor)
    cmd=(target/release/switchyard-bench floor --listen "127.0.0.1:$PORT" --threads 1 --runtime "$RT")
    raw=(--raw) ;;
  *) echo "relay or floor" >&2; exit 2 ;;
esac

valgrind --tool=callgrind --callgrind-out-file="$out" "${cmd[@]}" >/dev/null 2>"${out%.out}.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

json=$(target/release/switchyard-bench throughput "${raw[@]}" --addr "127.0.0.1:$PORT" \
  --servers "$SERVERS" --phones 1 --size "$SIZE" --warmup "$WARMUP" --duration "$DURATION" \
  --target "$KIND-$RT" 2> >(while read -r line; do
    case "$line" in
      "measure: start") callgrind_control -z "$PID" >/dev/null 2>&1 ;;
      "measure: end") callgrind_control -d "$PID" >/dev/null 2>&1 ;;
    esac
  done) | tail -1)
sleep 1
kill "$PID"; wait "$PID" 2>/dev/null || true
trap - EXIT

dump=$(ls "$out".* | head -1)
python3 - "$dump" "$json" <<'PY'
import json, sys
total = next(int(l.split()[1]) for l in open(sys.argv[1]) if l.startswith(("summary:", "totals:")))
r = json.loads(sys.argv[2])
n = r["round_trips"]
print(f"{r['target']}: {total:,} instructions, {n:,} round trips, {total / n:,.0f} per round trip "
      f"(dump {sys.argv[1]})")
PY
