#!/usr/bin/env bash
# Remove-heavy run: N distinct keys set then removed, on a fresh nun-db node and a fresh Redis
# (same persistence settings as the main rows). Prints a markdown table: resident memory and
# on-disk size idle and after the run, and the throughput of both.
# Usage: scripts/bench-churn.sh [N]   (called by scripts/bench.sh; needs a release build)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-1000000}
BIN=./target/release/nun-db
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 scripts/free_port.py; }
rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
mb() { python3 -c "print(f'{$1/1024:.1f}')"; }

mkdir -p "$WORK/nun" "$WORK/redis"
NUN_USER=admin NUN_PWD=bench NUN_FSYNC=everysec NUN_SNAPSHOT_INTERVAL=86400 NUN_TOMBSTONE_RETENTION=5 \
  NUN_MAX_OP_LOG_SIZE=100000000000 "$BIN" start --tcp-address 127.0.0.1:0 \
  --ws-address 127.0.0.1:0 --http-address 127.0.0.1:0 --dbs-dir "$WORK/nun" >"$WORK/nun.out" 2>&1 &
NUN_PID=$!; PIDS+=("$NUN_PID")
for _ in $(seq 6000); do grep -q '^ready ' "$WORK/nun.out" && break; sleep 0.005; done
TCP=$(grep -o 'tcp=[^ ]*' "$WORK/nun.out" | cut -d= -f2)
HTTP=$(grep -o 'http=[^ ]*' "$WORK/nun.out" | cut -d= -f2)
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --save '' --appendonly yes \
  --appendfsync everysec --daemonize no >"$WORK/redis.out" 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
for _ in $(seq 200); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

exec_nun() { "$BIN" -u admin -p bench -h "http://$HTTP" exec "$1" >/dev/null; }
# Bytes on disk: our snapshot files of the bench database; Redis's AOF after a rewrite.
nun_disk() { exec_nun "snapshot bench"; cat "$WORK"/nun/bench* | wc -c; }
redis_disk() {
  redis-cli -p "$REDIS_PORT" bgrewriteaof >/dev/null
  for _ in $(seq 400); do
    redis-cli -p "$REDIS_PORT" info persistence | grep -q '^aof_rewrite_in_progress:0' \
      && redis-cli -p "$REDIS_PORT" info persistence | grep -q '^aof_rewrite_scheduled:0' && break
    sleep 0.05
  done
  du -sb "$WORK/redis" | cut -f1
}

exec_nun "create-db bench bench-token"
NUN_IDLE=$(rss_kb "$NUN_PID"); NUN_DISK_IDLE=$(nun_disk)
REDIS_IDLE=$(rss_kb "$REDIS_PID"); REDIS_DISK_IDLE=$(redis_disk)
OUT=$("$BIN" -u admin -p bench bench --tcp "$TCP" --ws unused --value-size 100 --churn "$N" \
  --target "redis://127.0.0.1:$REDIS_PORT")
# Tombstones are kept for NUN_TOMBSTONE_RETENTION (5 s here, an hour by default), then fold
# into the database's version floors.
entries() {
  "$BIN" -u admin -p bench -h "http://$HTTP" exec "debug process-info" \
    | grep -o 'stored_entries: [0-9]*' | cut -d' ' -f2
}
ENTRIES_AT_END=$(entries)
t0=$(date +%s.%N)
for _ in $(seq 600); do ENTRIES=$(entries); [ "$ENTRIES" -le 66 ] && break; sleep 0.1; done
t1=$(date +%s.%N)
EXPIRY_SECS=$(python3 -c "print(f'{$t1-$t0:.1f}')")
NUN_AFTER=$(rss_kb "$NUN_PID"); NUN_DISK_AFTER=$(nun_disk)
REDIS_AFTER=$(rss_kb "$REDIS_PID"); REDIS_DISK_AFTER=$(redis_disk)
NUN_OPS=$(echo "$OUT" | sed -n 's/^churned.*(\([0-9]*\) ops\/s)/\1/p')
REDIS_OPS=$(echo "$OUT" | sed -n 's/^redis churned.*(\([0-9]*\) ops\/s)/\1/p')

echo "$N distinct keys (16 bytes, 100-byte values), each set then removed, in batches of 256 over"
echo "8 pipelined TCP connections. Command: \`scripts/bench-churn.sh $N\`. On disk: our snapshot"
echo "files of the database after \`snapshot\`; Redis's AOF after \`BGREWRITEAOF\`. nun-db runs with"
echo "\`NUN_TOMBSTONE_RETENTION=5\`; \"after\" is measured once the tombstones have expired."
echo
echo "| measure | nun-db | redis |"
echo "|---|---|---|"
echo "| set+remove ops/s | $NUN_OPS | $REDIS_OPS ($(python3 -c "print(f'{$NUN_OPS/$REDIS_OPS:.2f}')")× ours/redis) |"
echo "| RSS idle → after | $(mb "$NUN_IDLE") → $(mb "$NUN_AFTER") MB | $(mb "$REDIS_IDLE") → $(mb "$REDIS_AFTER") MB |"
echo "| on disk idle → after | $NUN_DISK_IDLE → $NUN_DISK_AFTER bytes | $REDIS_DISK_IDLE → $REDIS_DISK_AFTER bytes |"
echo "| entries in memory at the end of the run → after expiry | $ENTRIES_AT_END → $ENTRIES (\`\$connections\` + version floors), ${EXPIRY_SECS} s later | 0 keys |"
