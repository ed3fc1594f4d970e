// The official JS driver (npm nun-db@1.8.3, unmodified) against a real server on loopback.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const NunDb = require('nun-db');
const {
  ADMIN, startNode, stopNode, tcp: tcpTo, withTimeout,
} = require('./helpers');

let server;
const open = [];

// Sends admin command lines to the server over TCP.
const tcp = (lines) => tcpTo(server.tcp, lines);

function connect(props) {
  const db = new NunDb({ url: `ws://${server.ws}`, ...props });
  open.push(db);
  return db;
}

before(async () => {
  server = await startNode();
  const replies = await tcp([
    `auth ${ADMIN.join(' ')}`, 'create-db jsdb js-token', 'use-db jsdb js-token',
    'create-user reader reader-token', 'set-permissions reader r *',
    'create-user writer writer-token', 'set-permissions writer rw pub*',
  ]);
  assert.deepEqual(replies, ['valid auth', 'ok ', 'create-db success', 'ok ', 'ok ', 'ok ', 'ok ', 'ok ', 'ok ']);
});

after(() => {
  for (const db of open) {
    try { db.goOffline(); } catch (_) { /* already closed */ }
  }
  if (server) stopNode(server);
});

test('setValue / getValue round-trips strings and objects', async () => {
  const db = connect({ db: 'jsdb', token: 'js-token' });
  await db.setValue('name', 'mateus freira');
  assert.equal(await db.getValue('name'), 'mateus freira');
  await db.setValue('profile', { city: 'Belo Horizonte', tags: ['a b', 'c;d'] });
  assert.deepEqual(await db.getValue('profile'), { city: 'Belo Horizonte', tags: ['a b', 'c;d'] });
  assert.equal(await db.getValue('never-set'), null);
});

test('keys lists what was written', async () => {
  const db = connect({ db: 'jsdb', token: 'js-token' });
  await db.setValue('k-one', 1);
  await db.setValue('k-two', 2);
  const keys = await db.keys();
  assert.ok(keys.includes('k-one') && keys.includes('k-two'), keys.join(','));
  assert.ok(keys.includes('$connections'));
  assert.ok(!keys.some((k) => k.startsWith('$$')), 'security keys are hidden');
  assert.deepEqual(await db.keys('k-*'), ['k-one', 'k-two']);
});

test('watch gets the change written by another client', async () => {
  const watcher = connect({ db: 'jsdb', token: 'js-token' });
  const writer = connect({ db: 'jsdb', token: 'js-token' });
  const seen = [];
  let done;
  const got = new Promise((resolve) => { done = resolve; });
  await watcher.watch('live', (e) => { seen.push(e); if (e.value === 'second') done(); });
  // Replies come in order: once this get is answered, the watch is registered.
  await watcher.getValue('live');
  await writer.setValue('live', 'first');
  await writer.setValue('live', 'second');
  await withTimeout(got, 10000, 'watch push');
  assert.deepEqual(seen.map((e) => [e.name, e.value, String(e.version)]),
    [['live', 'first', '0'], ['live', 'second', '1']]);
});

test('remove deletes the key', async () => {
  const db = connect({ db: 'jsdb', token: 'js-token' });
  await db.setValue('temp', 'x');
  assert.equal(await db.getValue('temp'), 'x');
  await db.remove('temp');
  assert.equal(await db.getValue('temp'), null);
});

test('user login with {url, db, user, token}', async () => {
  const admin = connect({ db: 'jsdb', token: 'js-token' });
  await admin.setValue('shared', 'for readers');
  const reader = connect({ db: 'jsdb', user: 'reader', token: 'reader-token' });
  assert.equal(await reader.getValue('shared'), 'for readers');
  const writer = connect({ db: 'jsdb', user: 'writer', token: 'writer-token' });
  await writer.setValue('pub-note', 'hello');
  assert.equal(await writer.getValue('pub-note'), 'hello');
});

test('a wrong token is rejected with "Invalid token "', async () => {
  const db = connect({ db: 'jsdb', token: 'wrong' });
  await assert.rejects(withTimeout(db._connectionPromise, 10000, 'use-db rejection'),
    (e) => e.message === 'Invalid token ');
});

test('a write without permission is rejected with "permission denied"', async () => {
  const reader = connect({ db: 'jsdb', user: 'reader', token: 'reader-token' });
  await assert.rejects(withTimeout(reader.setValue('shared', 'nope'), 10000, 'set rejection'),
    (e) => e.message === 'permission denied');
  const writer = connect({ db: 'jsdb', user: 'writer', token: 'writer-token' });
  await assert.rejects(withTimeout(writer.setValue('private', 'nope'), 10000, 'set rejection'),
    (e) => e.message === 'permission denied');
});
