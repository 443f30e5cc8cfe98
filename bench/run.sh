#!/usr/bin/env bash
# Runs every scenario against the relay on both runtimes and against the floor pipe, on this
# machine, and writes the markdown table to docs/PERFORMANCE.md (or $OUT).
#
#   bash bench/run.sh                     # defaults below
#   SERVERS=100 PHONES=10 DURATION=10 bash bench/run.sh
#
# Everything runs on loopback. The relay's per-address limits are raised by flag; clients spread
# over 127.0.0.2-17 as source addresses.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS=${SERVERS:-100}
PHONES=${PHONES:-10}
SIZE=${SIZE:-64}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
RATE=${RATE:-5000}
IDLE_SERVERS=${IDLE_SERVERS:-1000}
IDLE_PHONES=${IDLE_PHONES:-9}
WORKERS=${WORKERS:-1}
# Load-generator threads; with one, the N × 1 rows measure the generator more than the relay.
GEN_THREADS=${GEN_THREADS:-$WORKERS}
OUT=${OUT:-docs/PERFORMANCE.md}
PORT=${PORT:-18480}

cargo build --release -q -p switchyard -p switchyard-bench
RELAY=target/release/switchyard
BENCH=target/release/switchyard-bench
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"

rows=$(mktemp)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

start_relay() { # runtime
  "$RELAY" --runtime "$1" --workers "$WORKERS" --listen "127.0.0.1:$PORT" --metrics-listen "" \
    --rate-burst 1000000 --max-connections 2000000 --max-connections-per-ip 1000000 \
    --ping-interval 5s >/dev/null 2>&1 &
  pids+=($!)
  RELAY_PID=$!
  for _ in $(seq 50); do curl -sf "127.0.0.1:$PORT/healthz" >/dev/null && return; sleep 0.1; done
  echo "relay did not start" >&2; exit 1
}

stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

run() { # label args...
  local label=$1; shift
  "$BENCH" "$@" --addr "127.0.0.1:$PORT" --target "$label" --threads "$GEN_THREADS" \
    2> >(grep -v '^measure: ' >&2) | tail -1 >>"$rows"
}

for rt in tokio smol; do
  start_relay "$rt"
  run "switchyard-$rt" throughput --servers "$SERVERS" --phones "$PHONES" --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP"
  run "switchyard-$rt" throughput --servers "$((SERVERS * PHONES))" --phones 1 --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP"
  run "switchyard-$rt" latency --servers "$SERVERS" --phones "$PHONES" --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP" --rate "$RATE"
  run "switchyard-$rt" latency --servers "$((SERVERS * PHONES))" --phones 1 --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP" --rate "$RATE"
  run "switchyard-$rt" churn --servers "$SERVERS" --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP"
  stop "$RELAY_PID"
  start_relay "$rt"
  run "switchyard-$rt" idle --servers "$IDLE_SERVERS" --phones "$IDLE_PHONES" --relay-pid "$RELAY_PID" --settle 12
  stop "$RELAY_PID"
done

# The floor pipe on each runtime. It pairs one phone with each binary, so its rows compare with
# the relay's "× 1" rows.
for rt in tokio smol; do
  "$BENCH" floor --listen "127.0.0.1:$PORT" --threads "$WORKERS" --runtime "$rt" >/dev/null &
  pids+=($!)
  FLOOR_PID=$!
  sleep 0.5
  run "floor-$rt" throughput --raw --servers "$((SERVERS * PHONES))" --phones 1 --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP"
  run "floor-$rt" latency --raw --servers "$((SERVERS * PHONES))" --phones 1 --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP" --rate "$RATE"
  stop "$FLOOR_PID"
done

python3 - "$rows" "$OUT" <<'PY'
import json, sys, os, datetime
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
def fmt(v): return f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)
table = [
    f"Measured {datetime.date.today()} on {os.cpu_count()} cores ({cpu}), load generator on the same",
    f"machine, relay and floor with `--workers {os.environ.get('WORKERS', '1')}`, load generator with "
    f"`--threads {os.environ.get('GEN_THREADS', os.environ.get('WORKERS', '1'))}`.",
    "",
    "| scenario | target | servers × phones | frame B | round trips/s | p50 µs | p99 µs | p99.9 µs | other |",
    "|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
    other = {k: r[k] for k in ("rate_per_s", "cycles_per_s", "bytes_per_connection", "connections", "failures") if k in r}
    table.append("| {} | {} | {} × {} | {} | {} | {} | {} | {} | {} |".format(
        r["scenario"], r["target"], r["servers"], r["phones"], r["frame_bytes"],
        fmt(r.get("round_trips_per_s", "")), fmt(r.get("p50_us", "")), fmt(r.get("p99_us", "")), fmt(r.get("p999_us", "")),
        ", ".join(f"{k}={fmt(v)}" for k, v in other.items())))
begin, end = "<!-- figures:begin -->", "<!-- figures:end -->"
path = sys.argv[2]
doc = open(path).read() if os.path.exists(path) else f"# Performance\n\n{begin}\n{end}\n"
head, rest = doc.split(begin, 1)
_, tail = rest.split(end, 1)
open(path, "w").write(head + begin + "\n" + "\n".join(table) + "\n" + end + tail)
print("\n".join(table))
PY
