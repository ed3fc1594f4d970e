// The official JS driver (npm nun-db@1.8.3, unmodified) as an arbiter in a 3-node cluster on
// loopback: becameArbiter on one node, conflicting setValueSafe calls from the two others, and
// the final value on every node is what the arbiter callback returned.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const NunDb = require('nun-db');
const {
  ADMIN, freePort, startNode, stopNode, tcp, eventually,
} = require('./helpers');

const nodes = [];
const open = [];

function connect(node) {
  const db = new NunDb({ url: `ws://${node.ws}`, db: 'arb', token: 'arb-token' });
  open.push(db);
  return db;
}

let primary;

before(async () => {
  const addrs = [];
  for (let i = 0; i < 3; i += 1) addrs.push(`127.0.0.1:${await freePort()}`);
  nodes.push(...await Promise.all(addrs.map((a) => startNode(a, {
    NUN_REPLICATE_ADDR: addrs.join(','), NUN_EXTERNAL_ADDR: a, NUN_ELECTION_TIMEOUT: '500',
  }))));
  await eventually(async () => {
    for (const n of nodes) {
      const lines = await tcp(n.tcp, [`auth ${ADMIN.join(' ')}`, 'cluster-state']);
      if (lines.some((l) => l.includes(`${n.tcp}(self):Primary`))) {
        primary = n;
        return true;
      }
    }
    return false;
  }, 30000, 'a primary is elected');
  assert.deepEqual(await tcp(primary.tcp, [`auth ${ADMIN.join(' ')}`, 'create-db arb arb-token arbiter']),
    ['valid auth', 'ok ', 'create-db success', 'ok ']);
  await eventually(async () => {
    const all = await Promise.all(nodes.map((n) => tcp(n.tcp, ['use-db arb arb-token'])));
    return all.every((l) => l[0] === 'ok ');
  }, 30000, 'every node has the database');
});

after(() => {
  for (const db of open) {
    try { db.goOffline(); } catch (_) { /* already closed */ }
  }
  nodes.forEach(stopNode);
});

test('becameArbiter on one node merges setValueSafe conflicts from two other nodes', async () => {
  const [arbiterNode, ...writerNodes] = [...nodes.filter((n) => n !== primary), primary];
  const returned = [];
  const arbiter = connect(arbiterNode);
  await arbiter.becameArbiter(({ key, values }) => {
    const merged = { value: values.map((v) => v.value).sort().join('+') };
    returned.push({ key, merged: merged.value });
    return merged;
  });
  // Replies on one connection come in order: this write's ok follows the arbiter's.
  await arbiter.setValue('registered', true);

  const [left, right] = writerNodes.map(connect);
  await left.setValue('doc', 'base');
  await left.setValue('doc', 'base2');
  await eventually(async () => (await right.getValue('doc')) === 'base2', 30000, 'doc replicated');
  // Both write on top of version 1 at the same time: one wins, the other is a conflict.
  left.setValueSafe('doc', 'left', 1);
  right.setValueSafe('doc', 'right', 1);

  await eventually(() => returned.length === 1, 30000, 'the arbiter was asked');
  assert.equal(returned[0].key, 'doc');
  assert.equal(returned[0].merged, 'left+right');
  for (const n of nodes) {
    const reader = connect(n);
    await eventually(async () => (await reader.getValue('doc')) === 'left+right', 30000,
      `node ${n.tcp} has the arbiter's value`);
  }
});
