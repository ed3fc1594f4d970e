#!/usr/bin/env bash
# Three nodes: writes on the primary read back on both secondaries; writes and removes sent to a
# secondary are forwarded and replicated everywhere. Usage: test-replication-dbs.sh [all] [N]
source "$(dirname "$0")/cluster-lib.sh"

run_once() {
  start_cluster 3
  local p s1 s2
  p=$(wait_primary); s1=$(( (p + 1) % 3 )); s2=$(( (p + 2) % 3 ))
  expect "${ADDRS[$p]}" 'valid auth\nok \ncreate-db success\nok ' \
    "auth $ADMIN_USER $ADMIN_PWD" "create-db rep rep-token"
  expect "${ADDRS[$p]}" 'ok \nok \nok ' "use-db rep rep-token" "set name mateus freira" "set sc a;b ü"
  for i in $s1 $s2; do
    expect_eventually "${ADDRS[$i]}" "value mateus freira" "use-db rep rep-token" "get name"
    expect_eventually "${ADDRS[$i]}" "value-version 0 a;b ü" "use-db rep rep-token" "get-safe sc"
  done
  # Through a secondary: the client reads its own write at once.
  expect "${ADDRS[$s1]}" 'ok \nok \nvalue-version 1 via secondary\nok \nok \nok ' \
    "use-db rep rep-token" "set name via secondary" "get-safe name" "remove sc" "increment n 3"
  for i in 0 1 2; do
    expect_eventually "${ADDRS[$i]}" "value-version 1 via secondary" "use-db rep rep-token" "get-safe name"
    expect_eventually "${ADDRS[$i]}" "value <Empty>" "use-db rep rep-token" "get sc"
    expect_eventually "${ADDRS[$i]}" "value 3" "use-db rep rep-token" "get n"
  done
  cleanup; PIDS=(); WORK=$(mktemp -d)
}

runs=1
[ "${1:-}" = "all" ] && runs=${2:-20}
for r in $(seq 1 "$runs"); do run_once; echo "replication run $r: PASS"; done
