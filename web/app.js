// streaming-cluster viewer. Plain ES2020, no build step, CSP-safe (no inline code/styles).
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const video = $('video');
  const statusEl = $('status');
  const latencyEl = $('latency');
  const qualityEl = $('quality');
  const unmuteEl = $('unmute');
  const liveEl = $('live');
  const goLiveEl = $('golive');
  const viewersEl = $('viewers');

  // A channel's page is /live/<channel>/ (the broadcast sends / there); tokens name their
  // channel, so each channel keeps its own.
  const params = new URLSearchParams(location.search);
  const fromPath = location.pathname.match(/^\/live\/([a-z0-9-]{1,63})\/$/);
  const channel = fromPath ? fromPath[1] : (params.get('channel') || '');
  const tokenKey = `sc.token.${channel}`;
  let token = params.get('t') || sessionStorage.getItem(tokenKey) || '';
  if (token) sessionStorage.setItem(tokenKey, token);
  $('channel').textContent = channel;

  // Live state, exposed for tests.
  const state = {
    hls: null,
    video,
    failovers: 0,
    lbFailures: 0, // LBs that failed, or had not answered /api/assign within LB_HEDGE_MS
    broadcast: location.host, // replaced by /api/cluster's "broadcast"
    baseUrl: location.origin,
    token,
    channel,
    playback: 'loading',
    atLiveEdge: null,
    viewers: null,
    // 'broadcast' events (detail: {broadcast, baseUrl}) when the page moves to another broadcast:
    // the chat follows the player.
    events: new EventTarget(),
    failover: (reason) => failover(reason),
    lbs: () => lbList(),
    // The LBs in the order the next failover asks them.
    lbOrder: () => lbOrderNow(),
  };
  window.scPlayer = state;

  const masterUrl = () =>
    `${state.baseUrl}/live/${encodeURIComponent(channel)}/master.m3u8?t=${encodeURIComponent(state.token)}&steering=0`; // no Content Steering: the page fails over itself through every LB, which always know the live broadcasts (a steering player whose broadcast died gets no fresh manifest)

  // Rewrite a request URL to the current broadcast: replace origin and `t` (only if it targets another origin).
  function rewrite(url) {
    const u = new URL(url, location.href);
    const base = new URL(state.baseUrl);
    if (u.origin === base.origin) return u.href;
    u.protocol = base.protocol;
    u.host = base.host;
    u.searchParams.set('t', state.token);
    return u.href;
  }

  function render() {
    statusEl.textContent = `${state.broadcast} · ${state.playback}`;
    statusEl.classList.toggle('error', state.playback.startsWith('error'));
  }
  function setPlayback(p) { state.playback = p; render(); }

  // ---- cluster info & failover ------------------------------------------
  // /api/cluster names every LB by its own URL. The browser's own fallback between the
  // addresses of one name does not skip an LB that accepts the connection and never answers
  // (hung), so the page tries them itself, each within LB_ATTEMPT_MS.
  const LB_ATTEMPT_MS = 1500;
  async function fetchClusterInfo(base) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), LB_ATTEMPT_MS);
    try {
      const r = await fetch(`${base}/api/cluster`, { cache: 'no-store', signal: ctl.signal });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const c = await r.json();
      if (typeof c.broadcast === 'string' && c.broadcast && state.failovers === 0) state.broadcast = c.broadcast;
      render();
      const lbs = Array.isArray(c.lbs) ? c.lbs.filter((x) => typeof x === 'string').map((x) => x.replace(/\/+$/, '')) : [];
      showChannels(Array.isArray(c.channels) ? c.channels : []);
      return { lbs };
    } finally {
      clearTimeout(timer);
    }
  }
  // Every channel, each a link to its address on an LB (which picks a broadcast for it and
  // hands over a token): the LB that answered last, chosen when clicked. The current channel is
  // marked, those not live here are marked offline.
  function showChannels(channels) {
    const nav = $('channels');
    const list = channels.filter((c) => c && typeof c.name === 'string' && /^[a-z0-9-]{1,63}$/.test(c.name));
    if (list.length < 2) return;
    nav.replaceChildren(...list.map((c) => {
      const a = document.createElement('a');
      a.href = `/live/${c.name}/`;
      a.dataset.channel = c.name;
      a.textContent = c.live === false ? `${c.name} (offline)` : c.name;
      if (c.name === channel) a.setAttribute('aria-current', 'page');
      a.addEventListener('click', (e) => {
        e.preventDefault();
        lbOrderNow().then((lbs) => location.assign(`${lbs.length ? lbs[0] : ''}/live/${c.name}/`));
      });
      return a;
    }));
    nav.hidden = false;
  }
  let clusterInfo = fetchClusterInfo(location.origin)
    .catch((e) => { console.warn('api/cluster failed', e); return { lbs: [] }; });
  // Without a list (the first answer failed), ask the broadcast we are on now.
  async function lbList() {
    let { lbs } = await clusterInfo;
    if (!lbs.length) {
      clusterInfo = fetchClusterInfo(state.baseUrl).catch(() => ({ lbs: [] }));
      ({ lbs } = await clusterInfo);
    }
    return lbs;
  }
  // The LB asked first: the last one that answered. Pages start on a random one, so a
  // broadcast's death does not send all its viewers to the same LB.
  let firstLb = Math.floor(Math.random() * 1024);
  const rotated = (lbs) => lbs.map((_, i) => lbs[(firstLb + i) % lbs.length]);
  const lbOrderNow = () => lbList().then(rotated);

  // Broadcasts that failed us recently: an LB may not have noticed a death yet (it polls every
  // second), so every one of them is excluded, not just the current one.
  const FAILED_MEMORY_MS = 30000;
  const failedAt = new Map();
  function excluded() {
    const now = Date.now();
    failedAt.set(state.broadcast, now);
    for (const [name, at] of failedAt) if (now - at > FAILED_MEMORY_MS) failedAt.delete(name);
    return [...failedAt.keys()].join(',');
  }

  // One LB's answer to /api/assign within LB_ATTEMPT_MS, or an error.
  async function askLb(lb, exclude, ctl) {
    const url = `${lb}/api/assign?channel=${encodeURIComponent(channel)}` +
      `&exclude=${encodeURIComponent(exclude)}`;
    const timer = setTimeout(() => ctl.abort(), LB_ATTEMPT_MS);
    try {
      const r = await fetch(url, { cache: 'no-store', signal: ctl.signal });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const a = await r.json();
      if (!a || typeof a.base_url !== 'string' || typeof a.token !== 'string') throw new Error('bad assign answer');
      return a;
    } finally {
      clearTimeout(timer);
    }
  }

  // The LBs in turn, the last one that answered first. A healthy LB answers in milliseconds:
  // one that has not after LB_HEDGE_MS (hung, or far away) keeps its chance while the next one
  // is asked too, so a hung LB costs the player LB_HEDGE_MS of its buffer, not LB_ATTEMPT_MS.
  const LB_HEDGE_MS = 500;
  async function assign() {
    const lbs = await lbList();
    const exclude = excluded();
    const order = lbs.map((_, i) => (firstLb + i) % lbs.length);
    return new Promise((resolve) => {
      let next = 0;
      let pending = 0;
      let done = false;
      let hedge = null;
      const asks = [];
      const finish = (answer) => {
        done = true;
        clearTimeout(hedge);
        for (const x of asks) x.ctl.abort();
        resolve(answer);
      };
      const launch = () => {
        if (done || next >= order.length) return;
        const index = order[next++];
        const ask = { ctl: new AbortController(), slow: false };
        asks.push(ask);
        pending++;
        clearTimeout(hedge);
        if (next < order.length) {
          hedge = setTimeout(() => { ask.slow = true; state.lbFailures++; launch(); }, LB_HEDGE_MS);
        }
        askLb(lbs[index], exclude, ask.ctl).then((a) => {
          if (done) return;
          firstLb = index;
          finish(a);
        }, (e) => {
          pending--;
          if (done) return;
          console.warn('assign via', lbs[index], 'failed:', e);
          if (!ask.slow) state.lbFailures++;
          if (next < order.length) launch();
          else if (pending === 0) finish(null);
        });
      };
      if (order.length) launch();
      else resolve(null);
    });
  }

  let failing = null;
  function failover(reason) {
    if (failing) return failing;
    console.warn('failover:', reason);
    // hls.js answers connection errors on the dead server by switching to lower levels (its error
    // controller runs before our ERROR handler); remember the level actually playing to restore it.
    if (state.hls && state.levelBeforeFailover === undefined) state.levelBeforeFailover = state.hls.currentLevel;
    setPlayback('switching server…');
    failing = (async () => {
      for (let attempt = 0; ; attempt++) {
        const a = await assign();
        if (a) { switchTo(a); return; }
        // Nothing left outside the exclusions: they may have recovered, so forget them. Never
        // give up: a little longer between rounds, each one bounded by LB_ATTEMPT_MS per LB.
        failedAt.clear();
        setPlayback('error: no server available, retrying…');
        await new Promise((res) => setTimeout(res, Math.min(500 * 2 ** attempt, 4000)));
      }
    })().finally(() => { failing = null; });
    return failing;
  }

  function switchTo(a) {
    state.baseUrl = new URL(a.base_url).origin;
    state.token = token = a.token;
    state.broadcast = typeof a.broadcast === 'string' && a.broadcast ? a.broadcast : new URL(a.base_url).host;
    state.failovers++;
    sessionStorage.setItem(tokenKey, token);
    const q = new URLSearchParams(location.search);
    q.set('t', token);
    q.delete('channel');
    history.replaceState(history.state, '', `/live/${channel}/?${q}`);
    state.events.dispatchEvent(new CustomEvent('broadcast', {
      detail: { broadcast: state.broadcast, baseUrl: state.baseUrl },
    }));
    // The buffer usually covers the switch: playback never stops, so no 'playing' event follows.
    setPlayback(!video.paused && video.readyState >= HTMLMediaElement.HAVE_FUTURE_DATA ? 'live' : 'buffering');
    if (state.hls) {
      const hls = state.hls;
      const prev = state.levelBeforeFailover;
      state.levelBeforeFailover = undefined;
      if (!hls.levels || hls.levels.length === 0) hls.loadSource(masterUrl());
      else {
        // Errors on the old server say nothing about the levels: clear them and undo the down-switch.
        for (const lvl of hls.levels) { lvl.loadError = 0; lvl.fragmentError = 0; }
        if (hls.autoLevelEnabled && Number.isInteger(prev) && prev >= 0 && prev < hls.levels.length &&
            hls.nextLoadLevel < prev) {
          hls.nextAutoLevel = prev;
          hls.nextLoadLevel = prev;
        }
        if (!hls.loadingEnabled) hls.startLoad(-1);
      }
    } else {
      video.src = masterUrl();
      video.play().catch(() => {});
    }
  }

  // ---- hls.js ------------------------------------------------------------
  const policy = (ttfb, maxLoad, timeoutRetries, errorRetries) => ({
    default: {
      maxTimeToFirstByteMs: ttfb,
      maxLoadTimeMs: maxLoad,
      timeoutRetry: { maxNumRetry: timeoutRetries, retryDelayMs: 0, maxRetryDelayMs: 0 },
      errorRetry: { maxNumRetry: errorRetries, retryDelayMs: 1000, maxRetryDelayMs: 4000 },
    },
  });

  function startHls() {
    const Base = Hls.DefaultConfig.loader;
    const gens = new WeakMap(); // request context / frag / part -> failover count when sent
    class FailoverLoader extends Base {
      load(context, config, callbacks) {
        context.url = rewrite(context.url);
        for (const o of [context, context.frag, context.part]) if (o) gens.set(o, state.failovers);
        const watchdog = blockingWatchdog(context.url);
        const done = (fn) => (...args) => { clearTimeout(watchdog); return fn && fn(...args); };
        super.load(context, config, {
          ...callbacks,
          onSuccess: done(callbacks.onSuccess),
          onError: done(callbacks.onError),
          onTimeout: done(callbacks.onTimeout),
          onAbort: done(callbacks.onAbort),
        });
      }
    }
    // Low latency leaves about PART-HOLD-BACK of buffer, less than hls.js takes to give up on
    // a blocking reload. A new part is due every part target, so a blocking reload unanswered
    // for two asks the broadcast a plain question; one that cannot answer it in 300 ms is
    // dead or hung (a source outage still answers at once).
    function blockingWatchdog(url) {
      if (!url.includes('_HLS_msn=')) return undefined;
      const details = hls.levels && hls.levels[Math.max(hls.currentLevel, 0)] && hls.levels[Math.max(hls.currentLevel, 0)].details;
      const partTarget = (details && details.partTarget) || 0.5;
      const generation = state.failovers;
      return setTimeout(async () => {
        const plain = new URL(url);
        plain.searchParams.delete('_HLS_msn');
        plain.searchParams.delete('_HLS_part');
        plain.searchParams.delete('_HLS_skip');
        const ctl = new AbortController();
        const timer = setTimeout(() => ctl.abort(), 300);
        try {
          const r = await fetch(plain, { cache: 'no-store', signal: ctl.signal });
          if (!r.ok && r.status >= 500) throw new Error(`HTTP ${r.status}`);
        } catch (e) {
          if (generation === state.failovers) failover('blocking reload unanswered');
        } finally {
          clearTimeout(timer);
        }
      }, 2000 * partTarget);
    }
    const hls = new Hls({
      loader: FailoverLoader,
      enableWorker: false, // blob: workers would be blocked by the CSP
      lowLatencyMode: true,
      // After any hiccup, catch up with the live edge by playing up to 10 % faster (no jump).
      maxLiveSyncPlaybackRate: 1.1,
      manifestLoadPolicy: policy(4000, 8000, 3, 4),
      playlistLoadPolicy: policy(4000, 8000, 3, 4),
      fragLoadPolicy: policy(4000, 20000, 3, 4),
    });
    state.hls = hls;

    hls.on(Hls.Events.ERROR, (_ev, data) => {
      if (data.type === Hls.ErrorTypes.NETWORK_ERROR) {
        // Requests sent to a previous server are stale: their retries already go to the new one.
        const key = [data.context, data.part, data.frag].find((o) => o && gens.has(o));
        const stale = key !== undefined && gens.get(key) < state.failovers;
        if (!stale) failover(`${data.details}${data.fatal ? ' (fatal)' : ''}`);
        else if (data.fatal && !failing) { // old-server request: restart loading on the new origin
          setTimeout(() => { if (!hls.loadingEnabled) hls.startLoad(-1); }, 0);
        }
      } else if (data.fatal && data.type === Hls.ErrorTypes.MEDIA_ERROR) {
        hls.recoverMediaError();
      } else if (data.fatal) {
        setPlayback(`error: ${data.details}`);
      }
    });
    hls.on(Hls.Events.MANIFEST_PARSED, () => {
      buildQualityMenu(hls.levels);
      video.play().catch(() => {});
    });
    hls.on(Hls.Events.LEVEL_SWITCHED, (_ev, data) => {
      const lvl = hls.levels[data.level];
      qualityEl.options[0].textContent = lvl && lvl.height && hls.autoLevelEnabled ? `Auto (${lvl.height}p)` : 'Auto';
    });
    qualityEl.addEventListener('change', () => { hls.currentLevel = Number(qualityEl.value); });

    hls.attachMedia(video);
    hls.loadSource(masterUrl());
  }

  function buildQualityMenu(levels) {
    while (qualityEl.options.length > 1) qualityEl.remove(1);
    levels.forEach((lvl, i) => {
      const opt = document.createElement('option');
      opt.value = String(i);
      opt.textContent = lvl.height ? `${lvl.height}p` : `${Math.round((lvl.bitrate || 0) / 1000)} kbps`;
      qualityEl.appendChild(opt);
    });
    qualityEl.value = '-1';
  }

  function startNative() {
    qualityEl.disabled = true;
    video.addEventListener('error', () => failover(`native error ${video.error && video.error.code}`));
    video.src = masterUrl();
    video.play().catch(() => {});
  }

  // ---- UI ------------------------------------------------------------------
  function syncMute() { unmuteEl.textContent = video.muted ? 'Unmute' : 'Mute'; }
  unmuteEl.addEventListener('click', () => {
    video.muted = !video.muted;
    if (!video.muted) video.volume = video.volume || 1;
    video.play().catch(() => {});
  });
  video.addEventListener('volumechange', syncMute);
  video.addEventListener('playing', () => setPlayback('live'));
  video.addEventListener('waiting', () => { if (!failing) setPlayback('buffering'); });
  video.addEventListener('timeupdate', () => { // e.g. after an error status while the buffer kept playing
    if (state.playback !== 'live' && !failing && !video.paused && video.readyState >= HTMLMediaElement.HAVE_FUTURE_DATA) setPlayback('live');
  });
  video.addEventListener('pause', () => { if (!video.ended && !failing) setPlayback('paused'); });

  function playingDateMs() {
    const h = state.hls;
    if (h && h.playingDate) return h.playingDate.getTime();
    if (!h && typeof video.getStartDate === 'function') {
      const sd = video.getStartDate().getTime();
      if (Number.isFinite(sd) && sd > 0) return sd + video.currentTime * 1000;
    }
    return null;
  }
  setInterval(() => {
    const pd = playingDateMs();
    let text = 'Latency: –';
    if (pd) text = `Latency: ${((Date.now() - pd) / 1000).toFixed(1)} s`;
    else if (state.hls && Number.isFinite(state.hls.latency) && state.hls.latency > 0) text = `Latency: ~${state.hls.latency.toFixed(1)} s (to live edge)`;
    latencyEl.textContent = text;
    state.latency = pd ? (Date.now() - pd) / 1000 : null;
  }, 1000);

  // ---- what this player reports ----------------------------------------------
  // Every REPORT_MS the page tells its broadcast how long it played, how long of that it
  // stalled and how far behind live it is (POST /api/player), so the operators' dashboard shows
  // what viewers see: their own networks and the time to find another broadcast included.
  // Stalled: started once, not paused, and waiting for media (or for another server).
  const REPORT_MS = 10000;
  const played = { watchS: 0, stallS: 0, since: performance.now(), started: false };
  state.reports = { sent: 0, lastStatus: null, ...played };
  video.addEventListener('playing', () => { played.started = true; });
  setInterval(() => {
    const now = performance.now();
    const dt = (now - played.since) / 1000;
    played.since = now;
    if (!played.started || video.paused) return;
    played.watchS += dt;
    if (state.playback !== 'live') played.stallS += dt;
    Object.assign(state.reports, { watchS: played.watchS, stallS: played.stallS });
  }, 250);
  function sendReport() {
    if (played.watchS <= 0 || !state.token) return;
    const body = JSON.stringify({
      watch_s: played.watchS,
      stall_s: Math.min(played.stallS, played.watchS),
      latency_s: Number.isFinite(state.latency) && state.latency >= 0 ? state.latency : null,
    });
    played.watchS = 0;
    played.stallS = 0;
    const url = `${state.baseUrl}/api/player?t=${encodeURIComponent(state.token)}`;
    // text/plain keeps it a simple request (no preflight); keepalive lets it leave with the page.
    fetch(url, { method: 'POST', body, keepalive: true, headers: { 'Content-Type': 'text/plain' } })
      .then((r) => { state.reports.sent++; state.reports.lastStatus = r.status; })
      .catch(() => { state.reports.lastStatus = 'failed'; });
  }
  setInterval(sendReport, REPORT_MS);
  addEventListener('pagehide', sendReport);

  // ---- live edge -------------------------------------------------------------
  // hls.js's liveSyncPosition is the live edge minus the hold-back the player aims for; being
  // more than 1.5 target durations behind it means the viewer paused or seeked back.
  function behindLive() {
    const h = state.hls;
    if (!h || !Number.isFinite(h.liveSyncPosition) || !h.liveSyncPosition) return null;
    return h.liveSyncPosition - video.currentTime;
  }
  function targetDuration() {
    const h = state.hls;
    const lvl = h && h.levels && h.levels[Math.max(h.currentLevel, 0)];
    return (lvl && lvl.details && lvl.details.targetduration) || 2;
  }
  function renderLive() {
    const behind = behindLive();
    let atEdge = null;
    let text = 'Connecting';
    if (behind !== null && video.readyState >= HTMLMediaElement.HAVE_CURRENT_DATA) {
      atEdge = behind < targetDuration() * 1.5 && !video.paused;
      text = atEdge ? 'LIVE' : `Behind live by ${Math.max(0, behind).toFixed(0)} s`;
    } else if (!state.hls && video.readyState >= HTMLMediaElement.HAVE_CURRENT_DATA) {
      atEdge = !video.paused;
      text = atEdge ? 'LIVE' : 'Paused';
    }
    state.atLiveEdge = atEdge;
    liveEl.textContent = text;
    liveEl.classList.toggle('behind', atEdge !== true);
    goLiveEl.hidden = atEdge !== false || !state.hls;
  }
  goLiveEl.addEventListener('click', () => {
    const h = state.hls;
    if (h && Number.isFinite(h.liveSyncPosition)) video.currentTime = h.liveSyncPosition;
    video.play().catch(() => {});
  });
  setInterval(renderLive, 1000);

  // hls.js speeds up towards its target latency only while it is less than one target
  // duration beyond it (further back it takes the viewer to have chosen to be there), so a
  // start that lands further back stays there: measured once in ten pages, 7 s behind at a 2 s
  // target. In the first seconds of playback, before the viewer could have moved, such a start
  // jumps to the live sync position instead.
  let playingSince = null;
  video.addEventListener('playing', () => { if (playingSince === null) playingSince = Date.now(); });
  setInterval(() => {
    const h = state.hls;
    if (!h || playingSince === null || video.paused || Date.now() - playingSince > 15000) return;
    const late = h.latency - h.targetLatency;
    if (Number.isFinite(late) && late > targetDuration() && Number.isFinite(h.liveSyncPosition)) {
      video.currentTime = h.liveSyncPosition;
    }
  }, 1000);

  // ---- total viewer count ----------------------------------------------------
  // GET <lb>/api/stats -> {"viewers","broadcasts"} every 5 s, LBs in turn; an LB without the
  // endpoint or unreachable just hides the count.
  function showViewers(n) {
    if (!Number.isFinite(n) || n < 0) return;
    state.viewers = n;
    viewersEl.textContent = `${n} watching`;
    viewersEl.hidden = false;
  }
  let statsLb = 0;
  async function pollStats() {
    const lbs = await lbList();
    for (let i = 0; i < lbs.length; i++) {
      const lb = lbs[(statsLb + i) % lbs.length];
      try {
        const ctl = new AbortController();
        const timer = setTimeout(() => ctl.abort(), LB_ATTEMPT_MS);
        const r = await fetch(`${lb}/api/stats`, { cache: 'no-store', signal: ctl.signal })
          .finally(() => clearTimeout(timer));
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        const s = await r.json();
        if (s && Number.isFinite(s.viewers)) {
          statsLb = (statsLb + i) % lbs.length;
          showViewers(s.viewers);
          return;
        }
      } catch (_) { /* try the next LB */ }
    }
    if (state.viewers === null) viewersEl.hidden = true;
  }
  pollStats();
  setInterval(pollStats, 5000);

  syncMute();
  render();
  if (!channel) setPlayback('error: no channel in the address (/live/<channel>/)');
  else if (!token) {
    // Come in through an LB, which picks a broadcast for this channel and hands a token.
    setPlayback('getting an access token…');
    lbOrderNow().then((lbs) => {
      if (lbs.length) location.replace(`${lbs[0]}/live/${channel}/`);
      else setPlayback('error: missing access token (t=…) and no load balancer known');
    });
  } else if (typeof Hls !== 'undefined' && Hls.isSupported()) startHls();
  else if (video.canPlayType('application/vnd.apple.mpegurl')) startNative();
  else setPlayback('error: this browser cannot play HLS');
})();
