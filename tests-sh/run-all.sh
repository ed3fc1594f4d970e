#!/usr/bin/env bash
# Runs every tests-sh scenario: starts a node on free loopback ports for the single-node
# scenarios (NUN_TCP_ADDR); the cluster scenarios start their own nodes.
set -euo pipefail
DIR=$(cd "$(dirname "$0")" && pwd)
BIN=${NUN_DB_BIN:-$DIR/../target/debug/nun-db}
WORK=$(mktemp -d)
export NUN_USER=admin NUN_PWD=run-all-pwd
NUN_LOG_LEVEL=warn "$BIN" start --tcp-address 127.0.0.1:0 --ws-address 127.0.0.1:0 \
  --http-address 127.0.0.1:0 --dbs-dir "$WORK/data" > "$WORK/node.out" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 600); do grep -q '^ready ' "$WORK/node.out" && break; sleep 0.05; done
NUN_TCP_ADDR=$(grep -o 'tcp=[^ ]*' "$WORK/node.out" | cut -d= -f2)
export NUN_TCP_ADDR NUN_DB_BIN=$BIN
failed=0
for t in "$DIR"/test-*.sh; do
  echo "== $(basename "$t")"
  if ! bash "$t"; then echo "FAILED: $(basename "$t")"; failed=$((failed + 1)); fi
done
total=$(ls "$DIR"/test-*.sh | wc -l)
echo "$((total - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
