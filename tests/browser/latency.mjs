#!/usr/bin/env node
// How far behind live the page plays in a real browser: Debian's headless chromium (via
// playwright-core) opens the viewer page of a running cluster (`streamctl up`) in a few
// independent contexts, lets them settle, then reads the page's own latency figure (now minus
// the PROGRAM-DATE-TIME at the play head, what the page shows) twice a second.
//
//   node tests/browser/latency.mjs '{"lb":"https://127.77.1.1:8443","seconds":60,"pages":2}'
//
// Optional keys: "channel" (test), "settle_s" (15), "classic" (true: hls.js with
// lowLatencyMode off, i.e. segments only, as a player that ignores parts), "chromium"
// (/usr/bin/chromium). Certificate errors are ignored: the cluster is a local one.
// Progress goes to stderr; stdout gets one JSON object: mode, pages, samples, mean_s, p50_s,
// p95_s, max_s, stall_s (time in `waiting` during the window, all pages), per_page[] (with
// target_latency_s: where hls.js aims).
import { chromium } from 'playwright-core';

const args = JSON.parse(process.argv[2] || '{}');
const lb = String(args.lb || '').replace(/\/+$/, '');
const channel = args.channel || 'test';
const seconds = Number(args.seconds || 60);
const settle = Number(args.settle_s || 15);
const pages = Number(args.pages || 2);
const classic = Boolean(args.classic);
const log = (...m) => console.error('[latency]', ...m);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Before the page's scripts: count time spent waiting, and (classic) turn parts off in hls.js.
function initScript(classicMode) {
  const s = { waitingAt: null, stallMs: 0 };
  window.__stall = s;
  document.addEventListener('waiting', () => { if (s.waitingAt === null) s.waitingAt = performance.now(); }, true);
  document.addEventListener('playing', () => {
    if (s.waitingAt !== null) { s.stallMs += performance.now() - s.waitingAt; s.waitingAt = null; }
  }, true);
  s.read = () => s.stallMs + (s.waitingAt !== null ? performance.now() - s.waitingAt : 0);
  if (classicMode) {
    let wrapped;
    Object.defineProperty(window, 'Hls', {
      configurable: true,
      get: () => wrapped,
      set: (Real) => {
        wrapped = class extends Real {
          constructor(config) { super({ ...config, lowLatencyMode: false }); }
        };
      },
    });
  }
}

function quantile(sorted, q) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

function summary(values) {
  const sorted = [...values].sort((x, y) => x - y);
  const round = (v) => (v === null ? null : Math.round(v * 100) / 100);
  return {
    samples: sorted.length,
    mean_s: round(sorted.length ? sorted.reduce((a, v) => a + v, 0) / sorted.length : null),
    p50_s: round(quantile(sorted, 0.5)),
    p95_s: round(quantile(sorted, 0.95)),
    max_s: round(sorted.length ? sorted[sorted.length - 1] : null),
  };
}

async function main() {
  if (!lb) throw new Error('missing "lb" in the JSON argument');
  const flags = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--autoplay-policy=no-user-gesture-required', '--disable-dev-shm-usage'];
  const browser = await chromium.launch({ executablePath: args.chromium || '/usr/bin/chromium', headless: true, args: flags });
  try {
    const opened = [];
    for (let i = 0; i < pages; i += 1) {
      const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 960, height: 600 } });
      await ctx.addInitScript(initScript, classic);
      const page = await ctx.newPage();
      await page.goto(`${lb}/?channel=${encodeURIComponent(channel)}`, { waitUntil: 'domcontentloaded' });
      opened.push(page);
    }
    for (const page of opened) {
      await page.waitForFunction(() => {
        const v = document.querySelector('video');
        return v && v.currentTime > 0.5 && !v.paused;
      }, null, { timeout: 40000, polling: 200 });
    }
    log(`${pages} page(s) playing (${classic ? 'classic' : 'low latency'}); settling ${settle} s`);
    await sleep(settle * 1000);
    const stallAt = await Promise.all(opened.map((p) => p.evaluate(() => window.__stall.read())));
    const samples = opened.map(() => []);
    const end = Date.now() + seconds * 1000;
    while (Date.now() < end) {
      const values = await Promise.all(opened.map((p) => p.evaluate(() => window.scPlayer.latency)));
      values.forEach((v, i) => { if (typeof v === 'number' && Number.isFinite(v)) samples[i].push(v); });
      await sleep(500);
    }
    const stallEnd = await Promise.all(opened.map((p) => p.evaluate(() => window.__stall.read())));
    // What hls.js aims at: PART-HOLD-BACK (HOLD-BACK in classic), plus 1 s per stall it saw
    // (its liveSyncOnStallIncrease), at most one target duration more.
    const targets = await Promise.all(opened.map((p) => p.evaluate(() => window.scPlayer.hls && window.scPlayer.hls.targetLatency)));
    const perPage = samples.map((s, i) => ({
      ...summary(s),
      target_latency_s: targets[i],
      stall_s: Math.round(stallEnd[i] - stallAt[i]) / 1000,
      url: opened[i].url().replace(/\?.*/, ''),
    }));
    const all = summary(samples.flat());
    const stall = perPage.reduce((a, p) => a + p.stall_s, 0);
    process.stdout.write(`${JSON.stringify({ mode: classic ? 'classic' : 'low-latency', pages, seconds, ...all, stall_s: Math.round(stall * 1000) / 1000, per_page: perPage })}\n`);
  } finally {
    await browser.close();
  }
}

main().catch((e) => { log(`failed: ${e.message}`); process.exitCode = 1; });
