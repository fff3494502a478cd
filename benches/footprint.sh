#!/usr/bin/env bash
# Resident memory of the dist services, idle and under a bounded load: `make size`
# runs it. A Mosquitto of its own and both services on free loopback ports, data in a
# temp folder; 3,000 POST /users from 32 parallel curls; then every user must have
# been applied by transaction-service, or it fails.
set -euo pipefail
BIN=${1:?usage: footprint.sh BIN_DIR}
REQUESTS=3000
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
broker=$(free_port); users=$(free_port); ledger=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$broker" > "$dir/m.conf"
"$mosquitto" -c "$dir/m.conf" > "$dir/m.log" 2>&1 & pids+=($!)
sleep 0.5
"$BIN/user-service" --db "$dir/u.db" --listen "127.0.0.1:$users" --broker "mqtt://127.0.0.1:$broker" > "$dir/u.log" 2>&1 & pids+=($!); up=$!
"$BIN/transaction-service" --db "$dir/t.db" --listen "127.0.0.1:$ledger" --broker "mqtt://127.0.0.1:$broker" > "$dir/t.log" 2>&1 & pids+=($!); tp=$!
for _ in $(seq 100); do
    curl -sf "127.0.0.1:$users/healthz" > /dev/null && curl -sf "127.0.0.1:$ledger/healthz" > /dev/null && break
    sleep 0.2
done
rss() { awk '/VmRSS|VmHWM/ { printf "%s %6d kB  ", $1, $2 }' "/proc/$1/status"; }
sleep 3
echo "footprint: idle    user-service        $(rss $up)"
echo "footprint: idle    transaction-service $(rss $tp)"
seq "$REQUESTS" | xargs -P 32 -I{} curl -s -o /dev/null -XPOST "127.0.0.1:$users/users" \
    -H 'content-type: application/json' -d '{"name":"u{}","email":"u{}@example.com"}'
for _ in $(seq 150); do
    applied=$(curl -s "127.0.0.1:$ledger/outbox" | python3 -c 'import json, sys; print(json.load(sys.stdin)["consumer"]["applied_since_start"])')
    [ "$applied" -ge "$REQUESTS" ] && break
    sleep 0.2
done
echo "footprint: after $REQUESTS POST /users (VmHWM: the peak)"
echo "footprint: loaded  user-service        $(rss $up)"
echo "footprint: loaded  transaction-service $(rss $tp)"
[ "$applied" -eq "$REQUESTS" ] || { echo "footprint: FAILED: transaction-service applied $applied of $REQUESTS users"; exit 1; }
