// The npm driver (nun-db 1.8.3, unmodified) after a conflict on an `arbiter` database. The
// server answers the stale write with `error $$conflitct unresolved $conflicts_<key>_<id>`
// (as NunDB does), but the driver has no handler for that error: the write's pending promise is
// never settled and stays first in its queue, so the next reply on that connection is matched to
// it. The workaround documented in README: settle it from an `_errorHandler` installed on the
// instance.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const NunDb = require('nun-db');
const {
  ADMIN, startNode, stopNode, tcp, eventually,
} = require('./helpers');

let node;
const open = [];

function connect() {
  const db = new NunDb({ url: `ws://${node.ws}`, db: 'cf', token: 'cf-token' });
  open.push(db);
  return db;
}

// The workaround: reject the pending write when the server reports an unresolved conflict,
// so the connection's reply queue stays in step. The arbiter still resolves it.
function settleConflicts(db) {
  const original = db._errorHandler.bind(db);
  db._errorHandler = (error) => {
    if (/^\$\$conflitct unresolved /.test(error.trim())) {
      const pending = db._dequeuePromise();
      if (pending) pending.pedingReject(new Error(error.trim()));
      return;
    }
    original(error);
  };
  return db;
}

before(async () => {
  node = await startNode();
  assert.deepEqual(await tcp(node.tcp, [`auth ${ADMIN.join(' ')}`, 'create-db cf cf-token arbiter']),
    ['valid auth', 'ok ', 'create-db success', 'ok ']);
});

after(() => {
  for (const db of open) {
    try { db.goOffline(); } catch (_) { /* already closed */ }
  }
  stopNode(node);
});

// A stale write to `key` (at version 2, written at 1) from `db`, with an arbiter connected.
async function conflict(db, key) {
  await db.setValue(key, 'one');
  await db.setValue(key, 'two');
  await db.setValue(key, 'three');
  return db.setValueSafe(key, 'stale', 1);
}

test('without the workaround the stale write stays pending and the queue is out of step', async () => {
  const arbiter = connect();
  await arbiter.becameArbiter(({ values }) => ({ value: values.map((v) => v.value).join('+') }));
  await arbiter.setValue('registered', true);
  const writer = connect();
  let settled = false;
  conflict(writer, 'plain').then(() => { settled = true; }, () => { settled = true; });
  // The server's answer came back (the arbiter got the offer)...
  await eventually(async () => (await tcp(node.tcp, ['use-db cf cf-token', 'keys $conflicts_plain_*']))
    .some((l) => l.startsWith('keys ,$conflicts_plain_')), 10000, 'the conflict record exists');
  // ...but the driver still waits for it: the next reply would be matched to this `set`.
  assert.equal(settled, false);
  assert.equal(writer._pendingPromises.length, 1);
  assert.equal(writer._pendingPromises[0].kind, 'set');
});

test('with the workaround the stale write rejects with the conflict and the connection goes on', async () => {
  const writer = settleConflicts(connect());
  await assert.rejects(conflict(writer, 'doc'), /^Error: \$\$conflitct unresolved \$conflicts_doc_\d+$/);
  assert.equal(writer._pendingPromises.length, 0);
  // The next calls on the same connection get their own replies (the arbiter, connected in the
  // first test, may already have merged the conflict).
  assert.ok(['three', 'three+stale'].includes(await writer.getValue('doc')));
  await writer.setValue('other', 'fine');
  assert.equal(await writer.getValue('other'), 'fine');
  await eventually(async () => (await writer.getValue('doc')) === 'three+stale', 10000,
    'the arbiter resolved the conflict');
});
