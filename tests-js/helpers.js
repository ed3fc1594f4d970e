// Shared by the JS driver tests: start nun-db on loopback, talk raw TCP to it, poll.
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const BIN = process.env.NUN_DB_BIN || path.join(__dirname, '..', 'target', 'debug', 'nun-db');
const ADMIN = ['admin', 'js-admin'];

// A free TCP port on 127.0.0.1, below the kernel's ephemeral range (32768+): never handed out
// meanwhile to a node's port-0 listeners or outgoing connections, as a released ephemeral port can be.
function freePort() {
  const port = 20000 + Math.floor(Math.random() * 12000);
  return new Promise((resolve) => {
    const s = net.createServer();
    s.on('error', () => resolve(freePort()));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(port)));
  });
}

// Starts a node (TCP on `tcp`, other listeners on ephemeral ports) in a fresh data dir, with
// extra environment `env`; resolves with { tcp, ws, http, dir, child } once it printed `ready`.
function startNode(tcp = '127.0.0.1:0', env = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nundb-js-'));
  const child = spawn(BIN, ['start', '--tcp-address', tcp, '--ws-address', '127.0.0.1:0',
    '--http-address', '127.0.0.1:0', '--dbs-dir', dir], {
    env: {
      ...process.env, NUN_USER: ADMIN[0], NUN_PWD: ADMIN[1], NUN_LOG_LEVEL: 'warn', ...env,
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('node did not become ready')), 30000);
    let buffered = '';
    let ready = false;
    child.stdout.on('data', (chunk) => {
      buffered += chunk.toString();
      const line = buffered.split('\n').find((l) => l.startsWith('ready '));
      if (line && !ready) {
        ready = true;
        clearTimeout(timer);
        const addrs = Object.fromEntries(line.slice(6).split(' ').map((kv) => kv.split('=')));
        resolve({ ...addrs, dir, child });
      }
    });
    child.on('exit', (code) => { if (!ready) reject(new Error(`node exited with ${code}`)); });
  });
}

// Kills a node started by startNode (by its own pid) and removes its data dir.
function stopNode(node) {
  node.child.kill('SIGKILL');
  fs.rmSync(node.dir, { recursive: true, force: true });
}

// Sends command lines to `addr` over TCP; resolves with every line once each got its envelope.
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

// Rejects with "timed out: <what>" if `promise` has not settled after `ms`.
function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms); }),
  ]);
}

module.exports = {
  ADMIN, freePort, startNode, stopNode, tcp, eventually, withTimeout,
};
