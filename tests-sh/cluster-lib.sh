#!/usr/bin/env bash
# Helpers for the cluster scenarios: start N nodes on free loopback ports, talk to them with
# netcat, find the primary. Every node started here is killed by pid on exit.
set -euo pipefail

BIN=${NUN_DB_BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/debug/nun-db}
ADMIN_USER=${NUN_USER:-admin}
ADMIN_PWD=${NUN_PWD:-admin}
WORK=$(mktemp -d)
declare -a PIDS ADDRS
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 "$(dirname "${BASH_SOURCE[0]}")/../scripts/free_port.py"; }

# send ADDR LINES...: sends each line, prints every reply line (nc -N closes after the last reply).
send() {
  local addr=$1; shift
  printf '%s\n' "$@" | nc -N -w 5 "${addr%:*}" "${addr#*:}"
}

# start_cluster N: ADDRS[i] = TCP address of node i
start_cluster() {
  local n=$1 i members=""
  for i in $(seq 0 $((n - 1))); do ADDRS[$i]="127.0.0.1:$(free_port)"; done
  members=$(IFS=,; echo "${ADDRS[*]}")
  for i in $(seq 0 $((n - 1))); do start_node "$i" "$members"; done
}

# start_node I MEMBERS: (re)starts node I and waits for its ready line.
start_node() {
  local i=$1 members=$2 out="$WORK/node$1.log"
  mkdir -p "$WORK/data$i"
  NUN_USER=$ADMIN_USER NUN_PWD=$ADMIN_PWD NUN_LOG_LEVEL=info "$BIN" start \
    --tcp-address "${ADDRS[$i]}" --ws-address 127.0.0.1:0 --http-address 127.0.0.1:0 \
    --dbs-dir "$WORK/data$i" --replicate-address "$members" --external-address "${ADDRS[$i]}" \
    >>"$out" 2>&1 &
  PIDS[$i]=$!
  disown "$!"
  for _ in $(seq 1 600); do
    [ "$(grep -c '^ready ' "$out" 2>/dev/null || true)" -ge "${3:-1}" ] && return 0
    sleep 0.05
  done
  echo "node $i did not start"; cat "$out"; exit 1
}

# primary: prints the index of the node that reports itself primary (empty if none).
primary() {
  local i
  for i in "${!ADDRS[@]}"; do
    [ -n "${PIDS[$i]}" ] || continue
    if send "${ADDRS[$i]}" "auth $ADMIN_USER $ADMIN_PWD" "cluster-state" 2>/dev/null \
        | grep -q "${ADDRS[$i]}(self):Primary"; then
      echo "$i"; return 0
    fi
  done
}

# wait_primary: waits (up to 20 s) for a primary and prints its index.
wait_primary() {
  local p
  for _ in $(seq 1 400); do
    p=$(primary)
    [ -n "$p" ] && { echo "$p"; return 0; }
    sleep 0.05
  done
  echo "no primary elected" >&2; return 1
}

# expect_eventually ADDR EXPECTED LINES...: polls until the replies contain EXPECTED.
expect_eventually() {
  local addr=$1 expected=$2; shift 2
  for _ in $(seq 1 400); do
    send "$addr" "$@" 2>/dev/null | grep -qxF -- "$expected" && return 0
    sleep 0.05
  done
  echo "FAIL: $addr never answered '$expected' to: $*"; send "$addr" "$@" || true; exit 1
}

# expect ADDR EXPECTED_OUTPUT LINES...: exact replies.
expect() {
  local addr=$1 expected=$2 got; shift 2
  got=$(send "$addr" "$@")
  if [ "$got" != "$(printf "$expected")" ]; then
    echo "FAIL: $*"; echo "expected:"; printf "$expected\n"; echo "got:"; echo "$got"; exit 1
  fi
}
