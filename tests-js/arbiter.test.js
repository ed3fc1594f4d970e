// The official JS driver (npm nun-db@1.8.3, unmodified) as an arbiter in a 3-node cluster on
// loopback: becameArbiter on one node, conflicting setValueSafe calls from the two others, and
// the final value on every node is what the arbiter callback returned.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const NunDb = require('nun-db');

const BIN = process.env.NUN_DB_BIN || path.join(__dirname, '..', 'target', 'debug', 'nun-db');
const nodes = [];
const open = [];

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function startNode(tcp, members) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nundb-js-cluster-'));
  const child = spawn(BIN, ['start', '--tcp-address', tcp, '--ws-address', '127.0.0.1:0',
    '--http-address', '127.0.0.1:0', '--dbs-dir', dir], {
    env: {
      ...process.env, NUN_USER: 'admin', NUN_PWD: 'js-admin', NUN_LOG_LEVEL: 'warn',
      NUN_REPLICATE_ADDR: members, NUN_EXTERNAL_ADDR: tcp, NUN_ELECTION_TIMEOUT: '500',
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const node = { tcp, dir, child, ws: null };
  nodes.push(node);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('node did not become ready')), 30000);
    let buffered = '';
    child.stdout.on('data', (chunk) => {
      buffered += chunk.toString();
      const line = buffered.split('\n').find((l) => l.startsWith('ready '));
      if (line && !node.ws) {
        clearTimeout(timer);
        node.ws = Object.fromEntries(line.slice(6).split(' ').map((kv) => kv.split('='))).ws;
        resolve(node);
      }
    });
    child.on('exit', (code) => reject(new Error(`node exited with ${code}`)));
  });
}

// Sends command lines to a node over TCP and resolves with every line once all envelopes arrived.
function tcp(addr, lines) {
  return new Promise((resolve, reject) => {
    const [host, port] = addr.split(':');
    const socket = net.connect(Number(port), host, () => socket.write(lines.join('\n') + '\n'));
    let data = '';
    socket.on('data', (chunk) => {
      data += chunk.toString();
      const replies = data.split('\n').filter((l) => l === 'ok ' || /^error .* $/.test(l));
      if (replies.length >= lines.length) {
        socket.end();
        resolve(data.split('\n').filter((l) => l.length));
      }
    });
    socket.on('error', reject);
  });
}

// Polls `check` every 50 ms until it returns true (or throws after `ms`).
async function eventually(check, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch (_) { /* not yet */ }
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function connect(node) {
  const db = new NunDb({ url: `ws://${node.ws}`, db: 'arb', token: 'arb-token' });
  open.push(db);
  return db;
}

let primary;

before(async () => {
  const addrs = [];
  for (let i = 0; i < 3; i += 1) addrs.push(`127.0.0.1:${await freePort()}`);
  await Promise.all(addrs.map((a) => startNode(a, addrs.join(','))));
  await eventually(async () => {
    for (const n of nodes) {
      const lines = await tcp(n.tcp, ['auth admin js-admin', 'cluster-state']);
      if (lines.some((l) => l.includes(`${n.tcp}(self):Primary`))) {
        primary = n;
        return true;
      }
    }
    return false;
  }, 30000, 'a primary is elected');
  assert.deepEqual(await tcp(primary.tcp, ['auth admin js-admin', 'create-db arb arb-token arbiter']),
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
  for (const n of nodes) {
    n.child.kill('SIGKILL');
    fs.rmSync(n.dir, { recursive: true, force: true });
  }
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
