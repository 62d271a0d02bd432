#!/usr/bin/env bash
# Redis killed and restarted under load. `limiter` (the default): limiter-svc (release build)
# on a fresh redis-server, `sluice-bench check-limit` at a fixed rate over three policies that
# differ only in their failure mode (bench/failover.toml). `queue`: queue-svc, `sluice-bench
# enqueue` at a fixed rate. Redis is killed with SIGKILL after DOWN_AT seconds and started
# again DOWN_FOR seconds later on the same port, then AFTER seconds more of load.
# The load generator's per-second lines show how each second went: answers, denials, errors
# (fail_closed checks and every enqueue answer UNAVAILABLE while Redis is away) and the
# latency of every answer, errors included. Its report covers the time Redis was away but for
# a second at each end: the breaker's open period, with the latency of the answers and of the
# UNAVAILABLE errors apart.
#
#   cargo build --release -p limiter-svc -p queue-svc -p sluice-bench
#   bench/failover.sh            # the limiter
#   bench/failover.sh queue      # the queue
#
# Settings from the environment: BIN (target/release), RATE (5000 requests/s), DOWN_AT (6 s),
# DOWN_FOR (6 s, at least 3), AFTER (6 s), REDIS_PORT (6392), LISTEN (127.0.0.1:50071).
# Everything runs on loopback and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICE=${1:-limiter}
case $SERVICE in
    limiter | queue) ;;
    *) echo "usage: bench/failover.sh [limiter|queue]" >&2; exit 1 ;;
esac
BIN=${BIN:-target/release}
RATE=${RATE:-5000}
DOWN_AT=${DOWN_AT:-6}
DOWN_FOR=${DOWN_FOR:-6}
AFTER=${AFTER:-6}
REDIS_PORT=${REDIS_PORT:-6392}
LISTEN=${LISTEN:-127.0.0.1:50071}

for binary in "$SERVICE-svc" sluice-bench; do
    [ -x "$BIN/$binary" ] || { echo "no $BIN/$binary: cargo build --release -p $SERVICE-svc -p sluice-bench" >&2; exit 1; }
done
[ "$DOWN_FOR" -ge 3 ] || { echo "DOWN_FOR must be at least 3 (seconds)" >&2; exit 1; }
for tool in redis-server redis-cli; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 1; }
done
# Whether something accepts connections on 127.0.0.1-style HOST:PORT.
listening() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
for address in "127.0.0.1:$REDIS_PORT" "$LISTEN"; do
    if listening "$address"; then
        echo "something already listens on $address; set REDIS_PORT or LISTEN" >&2
        exit 1
    fi
done

work=$(mktemp -d)
redis_pid= service_pid= bench_pid=
cleanup() {
    for pid in $bench_pid $service_pid $redis_pid; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Starts redis-server on REDIS_PORT and waits (at most 5 s) until it answers.
start_redis() {
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        >>"$work/redis.log" 2>&1 &
    redis_pid=$!
    for _ in $(seq 50); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "redis-server did not answer on port $REDIS_PORT; its log:" >&2
    cat "$work/redis.log" >&2
    exit 1
}

# Seconds since the load started, to a tenth.
since() {
    local ms=$((($(date +%s%N) - $1) / 1000000))
    echo "$((ms / 1000)).$((ms % 1000 / 100))"
}

start_redis
service_args=(--no-auth --listen "$LISTEN" --metrics-listen 127.0.0.1:0 --log warn
    --redis-url "redis://127.0.0.1:$REDIS_PORT")
load_args=(--target "http://$LISTEN" --rate "$RATE")
if [ "$SERVICE" = limiter ]; then
    service_args+=(--limits bench/failover.toml)
    load_args=(check-limit "${load_args[@]}" --policy fo-open --policy fo-closed --policy fo-local)
else
    load_args=(enqueue "${load_args[@]}" --queue failover)
fi
"$BIN/$SERVICE-svc" "${service_args[@]}" >"$work/service.log" 2>&1 &
service_pid=$!
for _ in $(seq 100); do
    listening "$LISTEN" && break
    kill -0 "$service_pid" 2>/dev/null || break
    sleep 0.1
done
if ! kill -0 "$service_pid" 2>/dev/null || ! listening "$LISTEN"; then
    echo "$SERVICE-svc did not start; its log:" >&2
    cat "$work/service.log" >&2
    exit 1
fi

started=$(date +%s%N)
# Measured: from a second after the kill to a second before the restart.
"$BIN/sluice-bench" "${load_args[@]}" \
    --warmup "$((DOWN_AT + 1))s" --duration "$((DOWN_FOR - 2))s" --cooldown "$((AFTER + 1))s" &
bench_pid=$!

sleep "$DOWN_AT"
kill -9 "$redis_pid"
wait "$redis_pid" 2>/dev/null || true
redis_pid=
echo "--- redis-server killed (SIGKILL) at $(since "$started") s" >&2
sleep "$DOWN_FOR"
start_redis
echo "--- redis-server answering again at $(since "$started") s" >&2

status=0
wait "$bench_pid" || status=$?
bench_pid=
echo "--- $SERVICE-svc's log (warnings and errors):" >&2
cat "$work/service.log" >&2
exit "$status"
