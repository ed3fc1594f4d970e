// The web console (GET / on the HTTP port) in headless Chromium: log in, see a key written by
// another connection appear live, set a key from the page and read it back over TCP, and watch
// the cluster view change when the primary of a 3-node cluster is killed. Screenshots go to
// target/console-*.png.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { chromium } = require('playwright-core');
const {
  ADMIN, freePort, startNode, stopNode, tcp, eventually,
} = require('./helpers');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SHOTS = path.join(__dirname, '..', 'target');

const nodes = [];
let browser;

// The index of the node that reports itself primary, or -1.
async function primaryIndex() {
  for (let i = 0; i < nodes.length; i += 1) {
    if (nodes[i].child.exitCode !== null || nodes[i].killed) continue;
    try {
      const lines = await tcp(nodes[i].tcp, [`auth ${ADMIN.join(' ')}`, 'cluster-state']);
      if (lines.some((l) => l.includes(`${nodes[i].tcp}(self):Primary`))) return i;
    } catch (_) { /* not up */ }
  }
  return -1;
}

before(async () => {
  const ports = [await freePort(), await freePort(), await freePort()];
  const members = ports.map((p) => `127.0.0.1:${p}`).join(',');
  for (const p of ports) {
    nodes.push(await startNode(`127.0.0.1:${p}`, {
      NUN_REPLICATE_ADDR: members, NUN_EXTERNAL_ADDR: `127.0.0.1:${p}`, NUN_ELECTION_TIMEOUT: '500',
    }));
  }
  await eventually(async () => (await primaryIndex()) >= 0, 30000, 'a primary is elected');
  const p = nodes[await primaryIndex()];
  const replies = await tcp(p.tcp, [`auth ${ADMIN.join(' ')}`, 'create-db ui ui-token']);
  assert.deepEqual(replies, ['valid auth', 'ok ', 'create-db success', 'ok ']);
  fs.mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  if (browser) await browser.close();
  for (const n of nodes) if (!n.killed) stopNode(n);
});

test('the console logs in, shows live changes, writes, and follows an election', async () => {
  const first = await primaryIndex();
  const view = nodes.findIndex((_, i) => i !== first);
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  await page.goto(`http://${nodes[view].http}/`);

  // A wrong password is refused with a clear message, and nothing else is shown.
  await page.selectOption('#mode', 'admin');
  await page.fill('#user', ADMIN[0]);
  await page.fill('#secret', 'wrong');
  await page.fill('#db', 'ui');
  await page.fill('#dbtoken', 'ui-token');
  await page.click('#connect');
  await page.waitForFunction(() => document.querySelector('#login-error').textContent.includes('Invalid admin'));
  assert.equal(await page.isVisible('#app'), false);
  await page.screenshot({ path: path.join(SHOTS, 'console-login-error.png') });

  await page.fill('#secret', ADMIN[1]);
  await page.click('#connect');
  await page.waitForSelector('#app', { state: 'visible' });
  assert.match(await page.textContent('#status'), /connected/);

  // Live view: a key written by another connection appears with its version.
  await page.fill('#watch-key', 'greeting');
  await page.click('#watch');
  await page.waitForSelector('#watched tr[data-key="greeting"]');
  const primary = nodes[first];
  await tcp(primary.tcp, ['use-db ui ui-token', 'set greeting hello from tcp']);
  await page.waitForFunction(() => {
    const row = document.querySelector('#watched tr[data-key="greeting"]');
    return row && row.querySelector('.value').textContent === 'hello from tcp'
      && row.querySelector('.version').textContent === '0';
  });
  await tcp(primary.tcp, ['use-db ui ui-token', 'set greeting second']);
  await page.waitForFunction(() => {
    const row = document.querySelector('#watched tr[data-key="greeting"]');
    return row.querySelector('.value').textContent === 'second' && row.querySelector('.version').textContent === '1';
  });

  // Set a key from the page; it is read back over TCP from another node.
  await page.fill('#set-key', 'from-page');
  await page.fill('#set-value', 'typed in a browser');
  await page.click('#set');
  await page.waitForSelector('#keys tr[data-key="from-page"]');
  await eventually(async () => {
    const lines = await tcp(primary.tcp, ['use-db ui ui-token', 'get from-page']);
    return lines.includes('value typed in a browser');
  }, 10000, 'the key set from the page is on the primary');
  await page.screenshot({ path: path.join(SHOTS, 'console-live.png') });

  // Cluster view: three members, one primary; kill it and see the election happen.
  await page.waitForFunction((addr) => {
    const rows = [...document.querySelectorAll('#members tbody tr')];
    return rows.length === 3 && rows.some((r) => r.dataset.member === addr && r.dataset.role === 'Primary');
  }, primary.tcp);
  await page.screenshot({ path: path.join(SHOTS, 'console-cluster-before.png') });
  primary.child.kill('SIGKILL');
  primary.killed = true;
  const handle = await page.waitForFunction((old) => {
    const rows = [...document.querySelectorAll('#members tbody tr')];
    const now = rows.find((r) => r.dataset.role === 'Primary');
    const gone = rows.find((r) => r.dataset.member === old);
    return now && now.dataset.member !== old && gone && gone.dataset.status === 'Disconnected'
      ? now.dataset.member : null;
  }, primary.tcp, { timeout: 30000 });
  const elected = await handle.jsonValue();
  assert.notEqual(elected, primary.tcp);
  assert.equal(nodes[await primaryIndex()].tcp, elected);
  await page.screenshot({ path: path.join(SHOTS, 'console-cluster-after.png') });
  fs.rmSync(primary.dir, { recursive: true, force: true });
});

test('the console reports a lost connection and reconnects', async () => {
  const alive = nodes.filter((n) => !n.killed);
  const target = alive[0];
  const page = await browser.newPage();
  await page.goto(`http://${target.http}/`);
  await page.fill('#db', 'ui');
  await page.fill('#secret', 'bad-token');
  await page.click('#connect');
  await page.waitForFunction(() => document.querySelector('#login-error').textContent === 'Invalid token');
  await page.fill('#secret', 'ui-token');
  await page.click('#connect');
  await page.waitForSelector('#app', { state: 'visible' });
  // The page's socket drops: it says so, then logs in again by itself.
  await page.evaluate(() => { session.ws.close(); });
  await page.waitForFunction(() => /reconnecting/.test(document.querySelector('#status').textContent));
  await page.waitForFunction(() => document.querySelector('#status').textContent === 'connected', null, { timeout: 20000 });
  await page.close();
});
