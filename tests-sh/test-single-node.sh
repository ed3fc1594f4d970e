#!/usr/bin/env bash
# A netcat scenario against one running node: exact replies for the common commands and a watch
# push seen by a second connection. Run by hand against `make run`:
#   NUN_USER=admin NUN_PWD=admin bash tests-sh/test-single-node.sh
# (NUN_TCP_ADDR picks another node; default 127.0.0.1:3014.)
set -euo pipefail
ADDR=${NUN_TCP_ADDR:-127.0.0.1:3014}
USER_=${NUN_USER:-admin}
PWD_=${NUN_PWD:-admin}
DB="sh$(date +%s%N)"
WORK=$(mktemp -d)
WATCHER=""
cleanup() { touch "$WORK/done"; [ -n "$WATCHER" ] && kill "$WATCHER" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

send() {
  printf '%s\n' "$@" | nc -N -w 5 "${ADDR%:*}" "${ADDR#*:}" \
    || { echo "FAIL: cannot reach a node at $ADDR (start one with make run)" >&2; exit 1; }
}

check() {
  local expected=$1 got; shift
  got=$(send "$@")
  if [ "$got" != "$(printf "$expected")" ]; then
    echo "FAIL: $*"; echo "expected:"; printf "$expected\n"; echo "got:"; echo "$got"; exit 1
  fi
}

# poll FILE TEXT: waits (up to 10 s) until FILE has a line equal to TEXT.
poll() {
  for _ in $(seq 1 200); do grep -qxF -- "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "FAIL: never saw '$2' in $1:"; cat "$1"; exit 1
}

check "valid auth\nok \ncreate-db success\nok " "auth $USER_ $PWD_" "create-db $DB $DB-token"
check "ok \nok \nvalue mateus freira\nok \nvalue-version 0 mateus freira\nok \nvalue <Empty>\nok " \
  "use-db $DB $DB-token" "set name mateus freira" "get name" "get-safe name" "get nope"
check "ok \nok \nok \nvalue 5\nok \nerror Key is not numeric \n" \
  "use-db $DB $DB-token" "increment n 2" "increment n 3" "get n" "increment name"
check "ok \nkeys ,\$connections,n,name\nok \nkeys ,name\nok " \
  "use-db $DB $DB-token" "keys" "keys na*"
check "ok \nok \nvalue <Empty>\nok \nok \nerror Invalid version! \n" \
  "use-db $DB $DB-token" "remove n" "get n" "set name v2" "set-safe name 0 stale"
check "error unknown command: foo \nerror Invalid token \nerror Not a valid database name \npong\nok " \
  "foo" "use-db $DB wrong" "use-db nodb x" "ping"

# Watch from a second connection, kept open until the scenario ends.
(printf 'use-db %s %s-token\nwatch greeting\n' "$DB" "$DB"; while [ ! -e "$WORK/done" ] && kill -0 $$ 2>/dev/null; do sleep 0.1; done) \
  | nc -w 30 "${ADDR%:*}" "${ADDR#*:}" > "$WORK/watch.out" &
WATCHER=$!
for _ in $(seq 1 200); do [ "$(grep -c '^ok $' "$WORK/watch.out" 2>/dev/null || true)" -ge 2 ] && break; sleep 0.05; done
check "ok \nok " "use-db $DB $DB-token" "set greeting hello world"
poll "$WORK/watch.out" "changed greeting hello world"
poll "$WORK/watch.out" "changed-version greeting 0 hello world"
check "valid auth\nok \nok " "auth $USER_ $PWD_" "delete-db $DB"
echo "single-node scenario: PASS"
