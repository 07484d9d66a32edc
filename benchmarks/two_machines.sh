#!/usr/bin/env bash
# Two "machines" on one box: the verify service in one network namespace, the draft service and the
# bench client in another, joined by a veth pair, with a chosen round trip added between them by the
# userspace delay proxy (this kernel has no netem). Runs `duo-client bench` once per round trip.
#
#   sudo bash benchmarks/two_machines.sh [--rtt-ms "0 5 10 20"] [--out DIR] [-- extra duo-client bench args]
#
# Needs root (ip netns) and duo installed (scripts/install.sh). Traffic stays on 10.77.0.0/24 inside the
# two namespaces. Everything is torn down on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
rtts="0 5 10 20"
out="bench-results/two-machines"
while [ $# -gt 0 ]; do
  case "$1" in
    --rtt-ms) rtts="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
bench_args=("$@")
py="${DUO_PYTHON:-$(pwd)/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
gpu=duo-gpu cpu=duo-cpu gpu_ip=10.77.0.1 cpu_ip=10.77.0.2
mkdir -p "$out"
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$gpu" 2>/dev/null || true
  ip netns del "$cpu" 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$gpu"
ip netns add "$cpu"
ip link add duo-veth-g type veth peer name duo-veth-c
ip link set duo-veth-g netns "$gpu"
ip link set duo-veth-c netns "$cpu"
ip -n "$gpu" addr add "$gpu_ip/24" dev duo-veth-g
ip -n "$cpu" addr add "$cpu_ip/24" dev duo-veth-c
for ns in "$gpu" "$cpu"; do
  ip -n "$ns" link set lo up
done
ip -n "$gpu" link set duo-veth-g up
ip -n "$cpu" link set duo-veth-c up

wait_healthy() {  # namespace address
  ip netns exec "$1" "$py" - "$2" <<'PY'
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
deadline = time.monotonic() + 600
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                sys.exit(0)
        except grpc.RpcError:
            pass
        time.sleep(0.2)
sys.exit("not healthy: " + sys.argv[1])
PY
}

ip netns exec "$gpu" "$py" -m duo.verify_service.cli serve --host "$gpu_ip" --port 50051 --threads 1 --device cpu \
  > "$out/verify.log" 2>&1 &
pids+=($!)
wait_healthy "$gpu" "$gpu_ip:50051"

for rtt in $rtts; do
  one_way=$("$py" -c "print($rtt / 2)")
  ip netns exec "$cpu" "$py" -m benchmarks.delay_proxy --listen "$cpu_ip:50061" --upstream "$gpu_ip:50051" \
    --delay-ms "$one_way" > "$out/proxy-$rtt.log" 2>&1 &
  proxy=$!
  ip netns exec "$cpu" "$py" -m duo.draft_service.cli serve --host "$cpu_ip" --port 50052 --threads 1 \
    --verify-addr "$cpu_ip:50061" > "$out/draft-$rtt.log" 2>&1 &
  draft=$!
  pids+=("$proxy" "$draft")
  wait_healthy "$cpu" "$cpu_ip:50052"
  echo "== added round trip ${rtt} ms ==" >&2
  ip netns exec "$cpu" "$py" -m duo.client.cli bench --draft-addr "$cpu_ip:50052" --no-warmup \
    --systems hf-generate,duo-nospec,duo-fixed,duo-sequential,duo-auto \
    --json-out "$out/rtt-$rtt.json" "${bench_args[@]}" | tee "$out/rtt-$rtt.txt"
  kill "$draft" "$proxy"
  wait "$draft" "$proxy" 2>/dev/null || true
done
"$py" -m benchmarks.rtt_summary "$out"/rtt-*.json | tee "$out/summary.txt"
