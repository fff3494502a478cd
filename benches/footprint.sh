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
# Our own processes only, by PID: TERM, up to 5 s, then KILL.
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do
        alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break; sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
fail() { echo "footprint: FAILED: $*"; exit 1; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
broker=$(free_port); users=$(free_port); ledger=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$broker" > "$dir/m.conf"
"$mosquitto" -c "$dir/m.conf" > "$dir/m.log" 2>&1 & pids+=($!)
sleep 0.5
"$BIN/user-service" --db "$dir/u.db" --listen "127.0.0.1:$users" --broker "mqtt://127.0.0.1:$broker" > "$dir/u.log" 2>&1 & pids+=($!); up=$!
"$BIN/transaction-service" --db "$dir/t.db" --listen "127.0.0.1:$ledger" --broker "mqtt://127.0.0.1:$broker" > "$dir/t.log" 2>&1 & pids+=($!); tp=$!
healthy=0
for _ in $(seq 100); do
    curl -sf -m 2 "127.0.0.1:$users/healthz" > /dev/null && curl -sf -m 2 "127.0.0.1:$ledger/healthz" > /dev/null && { healthy=1; break; }
    sleep 0.2
done
[ "$healthy" = 1 ] || fail "the services did not become healthy within 20 s (logs in $dir)"
rss() { awk '/VmRSS|VmHWM/ { printf "%s %6d kB  ", $1, $2 }' "/proc/$1/status"; }
sleep 3
echo "footprint: idle    user-service        $(rss $up)"
echo "footprint: idle    transaction-service $(rss $tp)"
seq "$REQUESTS" | xargs -P 32 -I{} curl -sf -m 10 -o /dev/null -XPOST "127.0.0.1:$users/users" \
    -H 'content-type: application/json' -d '{"name":"u{}","email":"u{}@example.com"}' \
    || fail "a POST /users failed or took over 10 s"
applied=0
for _ in $(seq 150); do
    applied=$(curl -sf -m 5 "127.0.0.1:$ledger/outbox" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["consumer"]["applied_since_start"])') \
        || fail "cannot read transaction-service's /outbox"
    [ "$applied" -ge "$REQUESTS" ] && break
    sleep 0.2
done
echo "footprint: after $REQUESTS POST /users (VmHWM: the peak)"
echo "footprint: loaded  user-service        $(rss $up)"
echo "footprint: loaded  transaction-service $(rss $tp)"
[ "$applied" -eq "$REQUESTS" ] || fail "transaction-service applied $applied of $REQUESTS users"
