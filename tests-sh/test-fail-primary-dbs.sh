#!/usr/bin/env bash
# Three nodes: kill -9 the primary; a secondary becomes primary and takes writes; the old primary
# restarts, rejoins as a secondary and catches up. Usage: test-fail-primary-dbs.sh [all] [N]
source "$(dirname "$0")/cluster-lib.sh"

run_once() {
  start_cluster 3
  local p np other members t0 t1
  members=$(IFS=,; echo "${ADDRS[*]}")
  p=$(wait_primary)
  expect "${ADDRS[$p]}" 'valid auth\nok \ncreate-db success\nok \nok \nok ' \
    "auth $ADMIN_USER $ADMIN_PWD" "create-db fail fail-token" "use-db fail fail-token" "set before kill"
  for i in 0 1 2; do expect_eventually "${ADDRS[$i]}" "value kill" "use-db fail fail-token" "get before"; done
  t0=$(date +%s%N)
  kill -9 "${PIDS[$p]}"; PIDS[$p]=""
  np=$(wait_primary)
  t1=$(date +%s%N)
  echo "failover: node $np is primary $(( (t1 - t0) / 1000000 )) ms after kill -9 of node $p"
  [ "$np" != "$p" ] || { echo "FAIL: dead node reported primary"; exit 1; }
  other=$(( 3 - p - np ))
  expect "${ADDRS[$np]}" 'ok \nok \nok ' "use-db fail fail-token" "set during failover" "remove before"
  expect "${ADDRS[$other]}" 'ok \nok ' "use-db fail fail-token" "set through other secondary"
  start_node "$p" "$members" 2
  for i in 0 1 2; do
    expect_eventually "${ADDRS[$i]}" "value failover" "use-db fail fail-token" "get during"
    expect_eventually "${ADDRS[$i]}" "value other secondary" "use-db fail fail-token" "get through"
    expect_eventually "${ADDRS[$i]}" "value <Empty>" "use-db fail fail-token" "get before"
  done
  [ "$(wait_primary)" = "$np" ] || { echo "FAIL: restarted node took over"; exit 1; }
  cleanup; PIDS=(); WORK=$(mktemp -d)
}

runs=1
[ "${1:-}" = "all" ] && runs=${2:-20}
for r in $(seq 1 "$runs"); do run_once; echo "fail-primary run $r: PASS"; done
