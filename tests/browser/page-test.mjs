#!/usr/bin/env node
// The viewer page in a real browser: Debian's headless chromium driven by playwright-core (no
// browser download). Run by crates/streamctl/tests/browser.rs against a local cluster:
//
//   node tests/browser/page-test.mjs '{"lb":"https://127.79.1.1:8443","channel":"test",
//     "ignore_https_errors":true,"broadcasts":{"broadcast1":"https://127.79.2.1:8443",...},
//     "out_dir":"/tmp/x"}'
//
// Optional keys: "ca_spki" (base64 SHA-256 of a SPKI chromium should trust instead of
// ignoring certificate errors), "chromium" (executable, default /usr/bin/chromium),
// "play_after_kill_s" (default 8), "timeout_s" (default 240), "admin_password" (then B logs
// in as `admin` instead of registering, and deletes a message as a moderator).
//
// Talks to its harness over stdio: prints `KILL <broadcast>` alone on a line when the
// broadcast of context A must die, or `LB hang|kill|start <lb url>` for an LB (start: back and
// healthy), then waits for one line on stdin (sent once it is done).
// Progress goes to stderr; the last stdout line is one JSON object with the result:
// ok, errors[], a_broadcast, b_broadcast, a_broadcast_after, startup_s, stall_before_kill_s,
// stall_s (waiting -> playing after the kill), frozen_s (play head still while not paused),
// failover_s, chat_reconnect_s, chat_reconnects, chat_roundtrip_ms[], html_inert, latency_s,
// low_latency (hls.js plays parts), latency_text (what the page shows),
// moderator_delete, logout, csp_violations[], page_errors[], hls_fatal[], screenshot,
// screenshot_phone, lb_phases[] (the LB A asks first hung, then another one dead, each followed
// by the death of A's broadcast: {lb_fault, lb, victim, broadcast_after, failover_s, stall_s,
// frozen_s, lb_failures}).
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';

const args = JSON.parse(process.argv[2] || '{}');
const lb = String(args.lb || '').replace(/\/+$/, '');
const channel = args.channel || 'test';
const broadcasts = args.broadcasts || {};
const outDir = args.out_dir || '.';
const playAfterKill = Number(args.play_after_kill_s || 8);
const timeoutS = Number(args.timeout_s || 240);
const log = (...m) => console.error('[page-test]', ...m);

const result = {
  ok: false, errors: [], a_broadcast: null, b_broadcast: null, a_broadcast_after: null,
  startup_s: null, stall_before_kill_s: null, stall_s: null, frozen_s: null, failover_s: null, chat_reconnect_s: null,
  chat_reconnects: null, chat_roundtrip_ms: [], html_inert: null, moderator_delete: null, logout: null, csp_violations: [], page_errors: [], hls_fatal: [],
  latency_s: null, screenshot: null, screenshot_phone: null, lb_phases: [],
};
let printed = false;
function finish(code) {
  if (!printed) {
    printed = true;
    result.ok = result.errors.length === 0;
    process.stdout.write(`${JSON.stringify(result)}\n`);
  }
  process.exitCode = code ?? (result.ok ? 0 : 1);
}

const lines = createInterface({ input: process.stdin });
const waiting = [];
lines.on('line', (l) => { const w = waiting.shift(); if (w) w.resolve(l); });
lines.on('close', () => { for (const w of waiting.splice(0)) w.reject(new Error('stdin closed before the harness answered')); });
const nextLine = () => new Promise((resolve, reject) => waiting.push({ resolve, reject }));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const secs = (ms) => Math.round(ms) / 1000;

// Installed in every page before its scripts: CSP violations, stalls from waiting/playing, and
// time the play head stood still while not paused (sampled every 100 ms).
function initScript() {
  const w = window;
  w.__csp = [];
  w.__stall = { since: performance.now(), waitingAt: null, stallMs: 0, frozenMs: 0, lastT: null, lastCT: null, events: [] };
  document.addEventListener('securitypolicyviolation', (e) => {
    w.__csp.push(`${e.effectiveDirective || e.violatedDirective} blocked ${e.blockedURI || '(inline)'} at ${e.sourceFile || '?'}:${e.lineNumber || 0}`);
  }, true);
  const s = w.__stall;
  document.addEventListener('waiting', () => { if (s.waitingAt === null) s.waitingAt = performance.now(); s.events.push(['waiting', Math.round(performance.now())]); }, true);
  document.addEventListener('playing', () => {
    if (s.waitingAt !== null) { s.stallMs += performance.now() - Math.max(s.waitingAt, s.since); s.waitingAt = null; }
    s.events.push(['playing', Math.round(performance.now())]);
  }, true);
  s.reset = () => {
    s.since = performance.now(); s.stallMs = 0; s.frozenMs = 0; s.events = [];
  };
  s.read = () => ({
    stallMs: s.stallMs + (s.waitingAt !== null ? performance.now() - Math.max(s.waitingAt, s.since) : 0),
    frozenMs: s.frozenMs, events: s.events,
  });
  setInterval(() => {
    const v = document.querySelector('video');
    if (!v) return;
    const now = performance.now();
    if (s.lastT !== null && !v.paused && v.currentTime - s.lastCT < 0.01) s.frozenMs += now - s.lastT;
    s.lastT = now;
    s.lastCT = v.currentTime;
  }, 100);
}

function originOf(url) { try { return new URL(url).origin; } catch (_) { return null; } }
function broadcastOf(url) {
  const o = originOf(url);
  for (const [name, u] of Object.entries(broadcasts)) if (originOf(u) === o) return name;
  return null;
}

async function watchPage(page, label) {
  page.on('pageerror', (e) => result.page_errors.push(`${label}: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content.Security.Policy/i.test(m.text())) result.csp_violations.push(`${label} console: ${m.text()}`);
  });
}

// CSP violations and fatal player errors a page saw (its window's record ends with it).
async function collectPageState(page, label) {
  try {
    const info = await page.evaluate(() => ({ csp: window.__csp || [], fatal: window.__hlsFatal || [] }));
    result.csp_violations.push(...info.csp.map((c) => `${label}: ${c}`));
    result.hls_fatal.push(...info.fatal.map((c) => `${label}: ${c}`));
  } catch (e) { log(`cannot read ${label}'s page state: ${e.message}`); }
}

// The page as it is now, wide and as a phone shows it.
async function screenshots(page) {
  try {
    result.screenshot = join(outDir, 'page.png');
    await page.screenshot({ path: result.screenshot });
    const wide = page.viewportSize();
    await page.setViewportSize({ width: 390, height: 844 });
    await sleep(300);
    result.screenshot_phone = join(outDir, 'page-phone.png');
    await page.screenshot({ path: result.screenshot_phone, fullPage: true });
    if (wide) await page.setViewportSize(wide);
  } catch (e) { log(`screenshot: ${e.message}`); }
}

async function waitPlaying(page, label, timeoutMs = 40000) {
  await page.waitForFunction(() => {
    const v = document.querySelector('video');
    return v && v.currentTime > 0.5 && !v.paused;
  }, null, { timeout: timeoutMs, polling: 200 });
  // Over 4 s, at least 2 s of media: playing, though a page that has just joined may rebuffer
  // once (its buffer starts near the live edge).
  const t1 = await page.evaluate(() => document.querySelector('video').currentTime);
  await sleep(4000);
  const t2 = await page.evaluate(() => document.querySelector('video').currentTime);
  if (!(t2 > t1 + 2)) throw new Error(`${label}: currentTime did not advance (${t1} -> ${t2})`);
  log(`${label}: playing, currentTime ${t1.toFixed(2)} -> ${t2.toFixed(2)}`);
}

async function hookHls(page) {
  await page.evaluate(() => {
    window.__hlsFatal = [];
    const p = window.scPlayer;
    if (p && p.hls && window.Hls) p.hls.on(window.Hls.Events.ERROR, (_e, d) => { if (d.fatal) window.__hlsFatal.push(`${d.type}/${d.details}`); });
  });
}

async function register(page, name, password, button = '#register') {
  await page.fill('#account-name', name);
  await page.fill('#account-password', password);
  await page.click(button);
  await page.waitForFunction(() => {
    const info = document.getElementById('account-info');
    const err = document.getElementById('account-error');
    return (info && !info.hidden) || (err && err.textContent);
  }, null, { timeout: 20000 });
  const err = await page.textContent('#account-error');
  if (err) throw new Error(`${button.slice(1)} ${name}: ${err}`);
  await page.waitForFunction((n) => window.scChat && window.scChat.state === 'connected' && window.scChat.user && window.scChat.user.name === n,
    name, { timeout: 20000 });
}

// Types a message into one page (Enter sends) and waits for it, as text, in the other.
async function roundtrip(from, to, text, timeoutMs = 15000) {
  await from.fill('#chat-input', text);
  const t0 = Date.now();
  await from.press('#chat-input', 'Enter');
  await to.waitForFunction((t) => [...document.querySelectorAll('#chat-list li.msg .text')].some((e) => e.textContent === t),
    text, { timeout: timeoutMs, polling: 50 });
  return Date.now() - t0;
}

async function step(name, fn) {
  log(`step: ${name}`);
  try {
    return await fn();
  } catch (e) {
    result.errors.push(`${name}: ${e.message.split('\n')[0]}`);
    log(`FAILED ${name}: ${e.message}`);
    return undefined;
  }
}

async function main() {
  if (!lb) throw new Error('missing "lb" in the JSON argument');
  mkdirSync(outDir, { recursive: true });
  const flags = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--autoplay-policy=no-user-gesture-required', '--disable-dev-shm-usage'];
  if (args.ca_spki) flags.push(`--ignore-certificate-errors-spki-list=${args.ca_spki}`);
  const browser = await chromium.launch({ executablePath: args.chromium || '/usr/bin/chromium', headless: true, args: flags });
  const ctxOptions = { ignoreHTTPSErrors: args.ignore_https_errors !== false, viewport: { width: 1280, height: 800 } };
  const nonce = randomBytes(4).toString('hex');
  let a; let b;
  try {
    // Context A: through the LB, like a viewer.
    const ctxA = await browser.newContext(ctxOptions);
    await ctxA.addInitScript(initScript);
    a = await ctxA.newPage();
    await watchPage(a, 'A');
    const started = Date.now();
    const okA = await step('A plays through the LB', async () => {
      await a.goto(`${lb}/?channel=${encodeURIComponent(channel)}`, { waitUntil: 'domcontentloaded' });
      await waitPlaying(a, 'A');
      result.startup_s = secs(Date.now() - started - 2000);
      result.a_broadcast = broadcastOf(a.url());
      if (!result.a_broadcast) throw new Error(`A landed on ${a.url()}, not a known broadcast`);
      await hookHls(a);
      return true;
    });
    if (!okA) return;

    // Context B: on another broadcast, with a token from /api/assign excluding A's.
    const ctxB = await browser.newContext(ctxOptions);
    await ctxB.addInitScript(initScript);
    b = await ctxB.newPage();
    await watchPage(b, 'B');
    const okB = await step('B plays on another broadcast', async () => {
      const r = await ctxB.request.get(`${lb}/api/assign?channel=${encodeURIComponent(channel)}&exclude=${encodeURIComponent(result.a_broadcast)}`);
      if (!r.ok()) throw new Error(`/api/assign: HTTP ${r.status()} ${await r.text()}`);
      const as = await r.json();
      await b.goto(`${as.base_url.replace(/\/+$/, '')}/?t=${encodeURIComponent(as.token)}&channel=${encodeURIComponent(channel)}`, { waitUntil: 'domcontentloaded' });
      result.b_broadcast = broadcastOf(b.url());
      if (!result.b_broadcast || result.b_broadcast === result.a_broadcast) throw new Error(`B is on ${b.url()}, A on ${result.a_broadcast}`);
      await waitPlaying(b, 'B');
      return true;
    });
    if (!okB) return;

    const password = `pw-${randomBytes(8).toString('hex')}`;
    const okUsers = await step('register a user in each context', async () => {
      await register(a, `pa_${nonce}`, password);
      if (args.admin_password) await register(b, 'admin', String(args.admin_password), '#login');
      else await register(b, `pb_${nonce}`, password);
      return true;
    });
    if (okUsers) {
      await step('chat A -> B across broadcasts', async () => {
        result.chat_roundtrip_ms.push(await roundtrip(a, b, `hello from A ${nonce}`));
      });
      await step('chat B -> A across broadcasts', async () => {
        result.chat_roundtrip_ms.push(await roundtrip(b, a, `hello from B ${nonce}`));
      });
      await step('HTML in a message is inert', async () => {
        const html = `<img src=x onerror="window.__pwned=1"><b>bold ${nonce}</b>`;
        await roundtrip(a, b, html);
        await a.waitForFunction((t) => [...document.querySelectorAll('#chat-list li.msg .text')].some((e) => e.textContent === t), html, { timeout: 10000 });
        const check = async (p) => p.evaluate(() => ({
          pwned: window.__pwned === 1,
          elements: document.querySelectorAll('#chat-list img, #chat-list b, #chat-pending img').length,
        }));
        const [ca, cb] = [await check(a), await check(b)];
        result.html_inert = !ca.pwned && !cb.pwned && ca.elements === 0 && cb.elements === 0;
        if (!result.html_inert) throw new Error(`HTML was interpreted: A ${JSON.stringify(ca)}, B ${JSON.stringify(cb)}`);
      });
      if (args.admin_password) {
        await step('a moderator deletes a message on every broadcast', async () => {
          const text = `delete me ${nonce}`;
          await roundtrip(a, b, text);
          const viewerButtons = await a.locator('#chat-list button.mod').count();
          if (viewerButtons) throw new Error(`a viewer sees ${viewerButtons} moderator buttons`);
          const item = b.locator('#chat-list li.msg').filter({ has: b.locator('.text', { hasText: text }) });
          const seq = await item.getAttribute('data-seq');
          await item.getByRole('button', { name: /^Delete message/ }).click();
          for (const p of [a, b]) {
            await p.waitForFunction((s) => !document.querySelector(`#chat-list li.msg[data-seq="${s}"]`), seq, { timeout: 10000 });
          }
          result.moderator_delete = true;
        });
      }
    }

    // Kill A's broadcast (the harness does it), then A must keep playing and chatting.
    const victim = result.a_broadcast;
    const before = await a.evaluate(() => window.__stall.read());
    result.stall_before_kill_s = secs(before.stallMs);
    const ctAtKill = await a.evaluate(() => { window.__stall.reset(); return document.querySelector('video').currentTime; });
    process.stdout.write(`KILL ${victim}\n`);
    await nextLine();
    const killedAt = Date.now();
    log(`${victim} killed; A at currentTime ${ctAtKill.toFixed(2)}`);

    await step('A fails over to another broadcast', async () => {
      await a.waitForFunction((v) => window.scPlayer.failovers > 0 && window.scPlayer.broadcast !== v, victim, { timeout: 30000, polling: 50 });
      result.failover_s = secs(Date.now() - killedAt);
      result.a_broadcast_after = await a.evaluate(() => window.scPlayer.broadcast);
    });
    if (okUsers) {
      await step('A chat reconnects to another broadcast', async () => {
        await a.waitForFunction((v) => window.scChat.state === 'connected' && window.scChat.broadcast && window.scChat.broadcast !== v,
          victim, { timeout: 30000, polling: 50 });
        result.chat_reconnect_s = secs(Date.now() - killedAt);
      });
    }
    await step(`A keeps playing for ${playAfterKill} s after the kill`, async () => {
      await a.waitForFunction((t) => document.querySelector('video').currentTime >= t, ctAtKill + playAfterKill,
        { timeout: (playAfterKill + 15) * 1000, polling: 200 });
    });
    const st = await a.evaluate(() => window.__stall.read());
    result.latency_s = await a.evaluate(() => window.scPlayer.latency);
    // hls.js plays parts: low-latency mode is on and the playlist it plays lists parts.
    result.low_latency = await a.evaluate(() => {
      const h = window.scPlayer.hls;
      const lvl = h && h.levels && h.levels[Math.max(h.currentLevel, 0)];
      const details = (h && h.latestLevelDetails) || (lvl && lvl.details);
      return !!(h && h.lowLatencyMode && details && details.partList && details.partList.length > 0);
    });
    result.latency_text = await a.evaluate(() => document.getElementById('latency').textContent);
    result.stall_s = secs(st.stallMs);
    result.frozen_s = secs(st.frozenMs);
    log(`after kill: stall ${result.stall_s} s, frozen ${result.frozen_s} s, events ${JSON.stringify(st.events)}`);
    if (okUsers) {
      await step('chat A -> B after the failover', async () => {
        result.chat_roundtrip_ms.push(await roundtrip(a, b, `A after failover ${nonce}`, 20000));
      });
      await step('chat B -> A after the failover', async () => {
        result.chat_roundtrip_ms.push(await roundtrip(b, a, `B after failover ${nonce}`, 20000));
      });
      result.chat_reconnects = await a.evaluate(() => window.scChat.reconnects);
      await step('no message shown twice in A', async () => {
        const dup = await a.evaluate(() => {
          const seqs = [...document.querySelectorAll('#chat-list li.msg')].map((e) => e.dataset.seq);
          return seqs.length - new Set(seqs).size;
        });
        if (dup) throw new Error(`${dup} duplicate messages`);
      });
      await step('B logs out', async () => {
        await b.click('#logout');
        await b.waitForFunction(() => !document.getElementById('account-form').hidden && !window.scChat.user
          && !localStorage.getItem('sc.session'), null, { timeout: 10000 });
        result.logout = true;
      });
    }

    // Every way in: the LB A would ask first is hung (then back), then the next first one is
    // dead; each time A's broadcast dies right after, and A must move on through another LB.
    const playAfterLbFault = 6;
    for (const fault of ['hang', 'kill']) {
      const ok = await step(`A survives an LB ${fault} and then its broadcast`, async () => {
        const [lbUrl] = await a.evaluate(() => window.scPlayer.lbOrder());
        if (!lbUrl) throw new Error('the page knows no LB');
        const phase = { lb_fault: fault, lb: lbUrl, victim: await a.evaluate(() => window.scPlayer.broadcast) };
        const lbFailuresBefore = await a.evaluate(() => window.scPlayer.lbFailures);
        process.stdout.write(`LB ${fault} ${lbUrl}\n`);
        await nextLine();
        const failoversBefore = await a.evaluate(() => window.scPlayer.failovers);
        const ct = await a.evaluate(() => { window.__stall.reset(); return document.querySelector('video').currentTime; });
        process.stdout.write(`KILL ${phase.victim}\n`);
        await nextLine();
        const killedAt = Date.now();
        await a.waitForFunction(([n, v]) => window.scPlayer.failovers > n && window.scPlayer.broadcast !== v,
          [failoversBefore, phase.victim], { timeout: 30000, polling: 50 });
        phase.failover_s = secs(Date.now() - killedAt);
        phase.broadcast_after = await a.evaluate(() => window.scPlayer.broadcast);
        await a.waitForFunction((t) => document.querySelector('video').currentTime >= t, ct + playAfterLbFault,
          { timeout: (playAfterLbFault + 15) * 1000, polling: 200 });
        const st = await a.evaluate(() => window.__stall.read());
        phase.stall_s = secs(st.stallMs);
        phase.frozen_s = secs(st.frozenMs);
        phase.lb_failures = (await a.evaluate(() => window.scPlayer.lbFailures)) - lbFailuresBefore;
        result.lb_phases.push(phase);
        log(`LB ${fault}: ${JSON.stringify(phase)}`);
        if (phase.lb_failures < 1) throw new Error(`A did not ask ${lbUrl} first: ${JSON.stringify(phase)}`);
        if (fault === 'hang') {
          process.stdout.write(`LB start ${lbUrl}\n`);
          await nextLine();
        }
        return true;
      });
      if (!ok) break;
    }
    // The player tells its broadcast what it plays (POST /api/player every 10 s).
    await step('A reports what it plays to its broadcast', async () => {
      await a.waitForFunction(() => window.scPlayer.reports.sent > 0 && window.scPlayer.reports.lastStatus === 204,
        null, { timeout: 25000, polling: 200 });
      result.player_reports = await a.evaluate(() => ({ sent: window.scPlayer.reports.sent, last_status: window.scPlayer.reports.lastStatus }));
    });
    // Last, as it leaves the page: the channel list, and another channel through an LB. What
    // the page saw so far is taken first: its window's records end with it.
    await screenshots(a);
    await collectPageState(a, 'A (test)');
    await step('A lists every channel and switches to another one', async () => {
      const links = await a.evaluate(() => [...document.querySelectorAll('#channels a')]
        .map((l) => ({ name: l.dataset.channel, current: l.getAttribute('aria-current') === 'page' })));
      result.channels = links.map((l) => l.name);
      const current = links.filter((l) => l.current).map((l) => l.name);
      if (current.length !== 1 || current[0] !== channel) throw new Error(`current channel: ${JSON.stringify(links)}`);
      const other = links.find((l) => !l.current);
      if (!other) throw new Error(`no other channel listed: ${JSON.stringify(links)}`);
      await a.click(`#channels a[data-channel="${other.name}"]`);
      await a.waitForURL((u) => u.pathname === `/live/${other.name}/`, { timeout: 20000 });
      await waitPlaying(a, `A on ${other.name}`);
      result.switched_to = { channel: other.name, broadcast: broadcastOf(a.url()), title: await a.textContent('#channel') };
    });
  } catch (e) {
    result.errors.push(`unexpected: ${e.message.split('\n')[0]}`);
    log(e.stack || e.message);
  } finally {
    for (const [p, label] of [[a, 'A'], [b, 'B']]) if (p) await collectPageState(p, label);
    if (a && !result.screenshot) await screenshots(a);
    await browser.close().catch(() => {});
  }
}

const watchdog = setTimeout(() => {
  result.errors.push(`timed out after ${timeoutS} s`);
  finish(1);
  process.exit(1);
}, timeoutS * 1000);
main()
  .catch((e) => { result.errors.push(`fatal: ${e.message}`); })
  .finally(() => {
    if (result.page_errors.length) result.errors.push(`${result.page_errors.length} page errors`);
    if (result.csp_violations.length) result.errors.push(`${result.csp_violations.length} CSP violations`);
    clearTimeout(watchdog);
    lines.close();
    finish();
  });
