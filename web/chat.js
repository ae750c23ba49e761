// streaming-cluster chat and accounts. Plain ES2020, no build step, CSP-safe (no inline code or
// styles). Everything from the network is rendered with textContent, never as HTML: names and
// messages are data, so "<img src=x onerror=...>" shows as those characters.
//
// Protocol (crates/core/src/chat_protocol.rs, whose tests check that this file sends and handles
// exactly its frames): wss://<broadcast>/api/chat/<channel>; first frame
// {"type":"hello","session","since"}; events carry a per-channel seq; a send carries a
// client-made id and is acked after commit; unacked sends are resent with the same id after a
// reconnect, so the server stores each once.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const player = window.scPlayer;
  if (!player) return;
  const channel = player.channel;

  const el = {
    form: $('account-form'), name: $('account-name'), password: $('account-password'),
    login: $('login'), register: $('register'), info: $('account-info'), user: $('account-user'),
    role: $('account-role'), logout: $('logout'), accountError: $('account-error'),
    chatState: $('chat-state'), list: $('chat-list'), pending: $('chat-pending'),
    chatForm: $('chat-form'), input: $('chat-input'), send: $('chat-send'), chatError: $('chat-error'),
  };

  const MAX_CHARS = 500;
  const SESSION_KEY = 'sc.session';
  const USER_KEY = 'sc.user';
  const MAX_SHOWN = 300; // older messages are dropped from the DOM

  // ---- state (exposed for tests) -------------------------------------------------------------
  const chat = {
    state: 'offline', // offline | connecting | connected | reconnecting
    broadcast: null, // broadcast named by the last welcome
    baseUrl: null, // origin of the broadcast the socket talks to
    lastSeq: null,
    user: null, // {name, role} from the server's welcome, or the stored one until then
    pending: new Map(), // id -> {text, li, timer}: sent (or queued) but not acked
    ops: new Map(), // id -> description, moderator operations waiting for their ack
    reconnects: 0,
    connects: 0,
    lastError: null,
    lastClose: null, // {code, reason, clean} of the last socket the server ended
  };
  window.scChat = chat;

  let session = localStorage.getItem(SESSION_KEY) || null;
  try { chat.user = JSON.parse(localStorage.getItem(USER_KEY) || 'null'); } catch (_) { chat.user = null; }

  // ---- helpers ----------------------------------------------------------------------------------
  function newId(prefix) {
    const raw = (crypto && typeof crypto.randomUUID === 'function')
      ? crypto.randomUUID()
      : Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');
    return prefix ? `${prefix}-${raw}` : raw;
  }
  const charCount = (s) => [...s].length;
  function showError(target, text) {
    target.textContent = text || '';
    if (target === el.chatError) chat.lastError = text || null;
  }
  function timeOf(at) {
    const d = new Date(at);
    return Number.isFinite(d.getTime()) ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }) : '';
  }
  function isModerator() {
    return !!chat.user && (chat.user.role === 'moderator' || chat.user.role === 'admin');
  }

  // What every error code means to the person in front of the page.
  const CHAT_ERRORS = {
    login_required: 'Log in to chat.',
    bad_session: 'Your session is no longer valid: log in again.',
    too_long: `Message too long: at most ${MAX_CHARS} characters.`,
    empty: 'Message is empty.',
    rate_limited: 'You are sending too fast: retrying in a moment…',
    muted: 'You are muted for now.',
    banned: 'You are banned from this chat.',
    forbidden: 'Only moderators can do that.',
    bad_request: 'The chat server did not understand that request.',
    unavailable: 'Chat is briefly unavailable (database failover): resending…',
  };

  // ---- accounts HTTP API (on the current broadcast, bearer session) --------------------------
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  const HTTP_ERRORS = {
    400: 'Invalid name or password (name: 3–32 letters, digits, _ or -; password: 8–256 characters).',
    401: 'Wrong name or password.',
    403: 'Not allowed.',
    409: 'That name is taken.',
    429: 'Too many attempts: wait a little and try again.',
    503: 'Accounts are unavailable (database failover): retry shortly.',
  };
  async function api(method, path, body, auth) {
    const headers = {};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (auth && session) headers.Authorization = `Bearer ${session}`;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 10000);
    let r;
    try {
      r = await fetch(`${player.baseUrl}${path}`, {
        method, headers, cache: 'no-store', signal: ctl.signal, mode: 'cors',
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiError(0, 'Cannot reach the server: check your connection and retry.');
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    if (r.status !== 204) { try { data = await r.json(); } catch (_) { data = null; } }
    if (!r.ok) {
      let msg = data && typeof data.error === 'string' && data.error ? data.error : (HTTP_ERRORS[r.status] || `Request failed (HTTP ${r.status}).`);
      const retry = r.headers.get('Retry-After');
      if (r.status === 429 && retry && !/\d+\s*s/.test(msg)) msg += ` (retry in ${retry} s)`;
      msg = msg.charAt(0).toUpperCase() + msg.slice(1);
      throw new ApiError(r.status, msg);
    }
    return data;
  }

  function setUser(user) {
    chat.user = user && typeof user.name === 'string' ? { name: user.name, role: String(user.role || 'viewer') } : null;
    if (chat.user) localStorage.setItem(USER_KEY, JSON.stringify(chat.user));
    else localStorage.removeItem(USER_KEY);
    renderAccount();
    refreshModButtons();
  }
  function setSession(token, user) {
    session = token || null;
    if (session) localStorage.setItem(SESSION_KEY, session);
    else localStorage.removeItem(SESSION_KEY);
    setUser(session ? user : null);
  }
  function renderAccount() {
    const inside = !!session && !!chat.user;
    el.form.hidden = inside;
    el.info.hidden = !inside;
    if (inside) {
      el.user.textContent = chat.user.name;
      el.role.textContent = chat.user.role === 'viewer' ? '' : `(${chat.user.role})`;
    }
    el.input.placeholder = inside ? 'Say something (Enter sends)' : 'Log in to chat';
  }

  function validAccountInput() {
    const name = el.name.value.trim();
    const password = el.password.value;
    if (!/^[A-Za-z0-9_-]{3,32}$/.test(name)) {
      showError(el.accountError, 'Name: 3–32 letters, digits, _ or -.');
      el.name.focus();
      return null;
    }
    if (charCount(password) < 8 || charCount(password) > 256) {
      showError(el.accountError, 'Password: 8–256 characters.');
      el.password.focus();
      return null;
    }
    return { name, password };
  }

  let busy = false;
  async function account(kind) {
    if (busy) return;
    const creds = validAccountInput();
    if (!creds) return;
    busy = true;
    el.login.disabled = el.register.disabled = true;
    showError(el.accountError, '');
    try {
      const data = await api('POST', `/api/account/${kind}`, creds, false);
      if (!data || typeof data.session !== 'string' || !data.user) throw new ApiError(0, 'Unexpected answer from the server.');
      el.password.value = '';
      setSession(data.session, data.user);
      showError(el.chatError, '');
      reconnectNow(); // the hello carries the session
      el.input.focus();
    } catch (e) {
      showError(el.accountError, e.message);
    } finally {
      busy = false;
      el.login.disabled = el.register.disabled = false;
    }
  }
  el.form.addEventListener('submit', (ev) => { ev.preventDefault(); account('login'); });
  el.register.addEventListener('click', () => account('register'));
  el.logout.addEventListener('click', async () => {
    showError(el.accountError, '');
    try {
      await api('POST', '/api/account/logout', undefined, true);
    } catch (e) {
      if (e.status !== 401) showError(el.accountError, `Logged out here, but the server did not confirm: ${e.message}`);
    }
    setSession(null, null);
    dropPending('Not sent: you logged out.');
    reconnectNow();
    el.name.focus();
  });

  // A stored session may have been revoked (logout elsewhere) or expired.
  async function checkSession() {
    if (!session) { setSession(null, null); return; }
    try {
      const data = await api('GET', '/api/account/me', undefined, true);
      if (data && data.user) setUser(data.user);
    } catch (e) {
      if (e.status === 401) {
        setSession(null, null);
        showError(el.accountError, 'Your session expired: log in again.');
      } // 503 or network: keep it, the chat's welcome will tell
    }
  }

  // ---- rendering ----------------------------------------------------------------------------------
  function nearBottom() {
    return el.list.scrollHeight - el.list.scrollTop - el.list.clientHeight < 40;
  }
  function appendItem(li) {
    const stick = nearBottom();
    el.list.appendChild(li);
    while (el.list.children.length > MAX_SHOWN) el.list.removeChild(el.list.firstChild);
    if (stick) el.list.scrollTop = el.list.scrollHeight;
  }
  function span(cls, text) {
    const s = document.createElement('span');
    s.className = cls;
    s.textContent = text;
    return s;
  }
  function modButton(label, aria, onClick) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'mod';
    b.textContent = label;
    b.setAttribute('aria-label', aria);
    b.addEventListener('click', onClick);
    return b;
  }
  function modTools(li) {
    const old = li.querySelector('.tools');
    if (old) old.remove();
    if (!isModerator()) return;
    const seq = Number(li.dataset.seq);
    const who = li.dataset.user;
    const tools = document.createElement('span');
    tools.className = 'tools';
    tools.appendChild(modButton('Delete', `Delete message from ${who}`, () => modOp({ type: 'delete', target: seq }, `delete message ${seq}`)));
    if (who !== chat.user.name) {
      tools.appendChild(modButton('Mute', `Mute ${who} for 10 minutes`, () => modOp({ type: 'mute', user: who, seconds: 600 }, `mute ${who}`)));
      tools.appendChild(modButton('Ban', `Ban ${who}`, () => modOp({ type: 'ban', user: who }, `ban ${who}`)));
    }
    li.appendChild(tools);
  }
  function refreshModButtons() {
    for (const li of el.list.querySelectorAll('li.msg')) modTools(li);
    for (const li of el.list.querySelectorAll('li.notice[data-banned]')) unbanTool(li);
  }
  function unbanTool(li) {
    const old = li.querySelector('.tools');
    if (old) old.remove();
    if (!isModerator()) return;
    const who = li.dataset.banned;
    const tools = document.createElement('span');
    tools.className = 'tools';
    tools.appendChild(modButton('Unban', `Unban ${who}`, () => modOp({ type: 'unban', user: who }, `unban ${who}`)));
    li.appendChild(tools);
  }

  function renderMessage(ev) {
    const li = document.createElement('li');
    li.className = 'msg';
    li.dataset.seq = String(ev.seq);
    li.dataset.user = String(ev.user);
    li.dataset.id = String(ev.id || '');
    const t = document.createElement('time');
    t.textContent = timeOf(ev.at);
    if (typeof ev.at === 'string') t.dateTime = ev.at;
    li.appendChild(t);
    li.appendChild(span('user', String(ev.user)));
    if (ev.role && ev.role !== 'viewer') li.appendChild(span('role', String(ev.role)));
    li.appendChild(span('text', String(ev.text)));
    modTools(li);
    appendItem(li);
  }
  function renderNotice(text, banned) {
    const li = document.createElement('li');
    li.className = 'notice';
    li.appendChild(span('text', text));
    if (banned) { li.dataset.banned = banned; unbanTool(li); }
    appendItem(li);
  }

  function renderPending(id, text) {
    const li = document.createElement('li');
    li.className = 'msg mine';
    li.dataset.id = id;
    li.appendChild(span('user', chat.user ? chat.user.name : 'you'));
    li.appendChild(span('text', text));
    li.appendChild(span('sending', 'sending…'));
    el.pending.appendChild(li);
    return li;
  }
  function settle(id) {
    const p = chat.pending.get(id);
    if (!p) return;
    clearTimeout(p.timer);
    p.li.remove();
    chat.pending.delete(id);
  }
  // Stored (ack or the message event itself): a "retrying" notice is over.
  function delivered(id) {
    if (!chat.pending.has(id)) return;
    settle(id);
    if (chat.lastError === CHAT_ERRORS.unavailable || chat.lastError === CHAT_ERRORS.rate_limited) showError(el.chatError, '');
  }
  function dropPending(reason) {
    const any = chat.pending.size > 0;
    for (const id of [...chat.pending.keys()]) settle(id);
    if (reason && any) showError(el.chatError, reason);
  }

  // ---- events ---------------------------------------------------------------------------------------
  function fresh(ev) {
    const seq = Number(ev.seq);
    if (!Number.isSafeInteger(seq)) return false;
    if (chat.lastSeq !== null && seq <= chat.lastSeq) return false; // replayed: already shown
    chat.lastSeq = seq;
    return true;
  }
  function onEvent(ev) {
    switch (ev.type) {
      case 'welcome':
        chat.state = 'connected';
        chat.broadcast = typeof ev.broadcast === 'string' ? ev.broadcast : null;
        attempts = 0;
        // A session the server did not accept comes with a bad_session error; a null user here
        // alone (say, while the DB fails over) does not log anyone out.
        if (ev.user && typeof ev.user.name === 'string') setUser(ev.user);
        renderChatState();
        for (const [id, p] of chat.pending) send({ type: 'send', id, text: p.text });
        break;
      case 'message':
        if (!fresh(ev)) break;
        if (chat.user && ev.user === chat.user.name) delivered(ev.id);
        renderMessage(ev);
        break;
      case 'delete': {
        if (!fresh(ev)) break;
        const li = el.list.querySelector(`li.msg[data-seq="${Number(ev.target)}"]`);
        if (li) li.remove();
        break;
      }
      case 'mute':
        if (!fresh(ev)) break;
        renderNotice(`${ev.user} was muted until ${timeOf(ev.until) || '?'} by ${ev.by}.`);
        if (chat.user && ev.user === chat.user.name) showError(el.chatError, `You are muted until ${timeOf(ev.until)}.`);
        break;
      case 'ban':
        if (!fresh(ev)) break;
        renderNotice(`${ev.user} was banned by ${ev.by}.`, String(ev.user));
        if (chat.user && ev.user === chat.user.name) showError(el.chatError, CHAT_ERRORS.banned);
        break;
      case 'unban':
        if (!fresh(ev)) break;
        renderNotice(`${ev.user} was unbanned by ${ev.by}.`);
        break;
      case 'ack':
        delivered(ev.id);
        chat.ops.delete(ev.id);
        break;
      case 'error':
        onError(ev);
        break;
      default:
        break; // unknown types are ignored: the server may grow
    }
  }

  function onError(ev) {
    const code = String(ev.code || '');
    const text = CHAT_ERRORS[code] || (ev.message ? String(ev.message) : `Chat error: ${code || 'unknown'}`);
    const id = typeof ev.id === 'string' ? ev.id : null;
    const p = id ? chat.pending.get(id) : null;
    if (p && (code === 'unavailable' || code === 'rate_limited')) {
      // Not stored: resend the same id a little later (the server stores an id only once).
      showError(el.chatError, text);
      clearTimeout(p.timer);
      p.timer = setTimeout(() => { if (chat.pending.has(id)) send({ type: 'send', id, text: p.text }); }, code === 'unavailable' ? 1000 : 1500);
      return;
    }
    if (p) settle(id);
    if (id && chat.ops.has(id)) {
      const what = chat.ops.get(id);
      chat.ops.delete(id);
      showError(el.chatError, `Could not ${what}: ${text}`);
      return;
    }
    if (code === 'bad_session') {
      setSession(null, null);
      dropPending();
      reconnectNow();
      el.name.focus();
    }
    if (code === 'login_required') {
      if (session) { setSession(null, null); dropPending(); }
      el.name.focus();
    }
    showError(el.chatError, p ? `Not sent (“${p.text.slice(0, 40)}”): ${text}` : text);
  }

  // ---- socket ---------------------------------------------------------------------------------------
  let ws = null;
  let gen = 0;
  let attempts = 0;
  let retryTimer = null;

  function renderChatState() {
    const labels = { offline: 'offline', connecting: 'connecting…', connected: 'connected', reconnecting: 'reconnecting…' };
    el.chatState.textContent = chat.state === 'connected' && chat.broadcast ? `connected (${chat.broadcast})` : labels[chat.state];
    el.chatState.className = `chat-state ${chat.state}`;
  }
  function wsUrl(base) {
    const u = new URL(base);
    u.protocol = u.protocol === 'http:' ? 'ws:' : 'wss:';
    u.pathname = `/api/chat/${encodeURIComponent(channel)}`;
    u.search = '';
    u.hash = '';
    return u.href;
  }
  function send(obj) {
    if (!ws || ws.readyState !== WebSocket.OPEN || chat.state !== 'connected') return false;
    ws.send(JSON.stringify(obj));
    return true;
  }

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (ws) {
      const old = ws;
      ws = null;
      old.onopen = old.onmessage = old.onclose = old.onerror = null;
      try { old.close(1000, 'moving'); } catch (_) { /* already closed */ }
    }
    const my = ++gen;
    const base = player.baseUrl;
    chat.baseUrl = base;
    chat.state = chat.connects > 0 ? 'reconnecting' : 'connecting';
    if (chat.connects > 0) chat.reconnects++;
    chat.connects++;
    renderChatState();
    let sock;
    try {
      sock = new WebSocket(wsUrl(base));
    } catch (e) {
      scheduleReconnect();
      return;
    }
    ws = sock;
    // No welcome within 8 s (hung server): give up on this socket.
    const welcomeTimer = setTimeout(() => { if (my === gen && chat.state !== 'connected') sock.close(1000, 'no welcome'); }, 8000);
    sock.onopen = () => {
      if (my !== gen) return;
      sock.send(JSON.stringify({ type: 'hello', session: session || null, since: chat.lastSeq }));
    };
    sock.onmessage = (msg) => {
      if (my !== gen) return;
      let ev;
      try { ev = JSON.parse(msg.data); } catch (_) { return; }
      if (ev && typeof ev === 'object') onEvent(ev);
    };
    sock.onerror = () => { /* a close follows */ };
    sock.onclose = (ev) => {
      clearTimeout(welcomeTimer);
      if (my !== gen) return;
      ws = null;
      chat.lastClose = { code: ev.code, reason: ev.reason, clean: ev.wasClean };
      for (const p of chat.pending.values()) clearTimeout(p.timer);
      chat.state = 'reconnecting';
      renderChatState();
      // 1001: the broadcast is going away (shutting down). Playback would fail there next: move
      // the player now; the chat follows it (the 'broadcast' event cuts the backoff short).
      // Every code retries with backoff (1006 without a handshake, 1008 policy, 1009 too big,
      // 1011, 1013 try again later); unacked messages are resent after the next welcome.
      if (ev.code === 1001 && chat.baseUrl === player.baseUrl && typeof player.failover === 'function') {
        player.failover('chat: broadcast going away');
      }
      scheduleReconnect();
    };
  }

  // Leaving the page closes the socket with a handshake (1000) instead of a dropped connection;
  // a page restored from the back/forward cache connects again.
  window.addEventListener('pagehide', () => {
    if (!ws) return;
    const old = ws;
    ws = null;
    gen++;
    clearTimeout(retryTimer);
    retryTimer = null;
    old.onopen = old.onmessage = old.onclose = old.onerror = null;
    try { old.close(1000, 'page closed'); } catch (_) { /* already closed */ }
    chat.state = 'offline';
  });
  window.addEventListener('pageshow', (ev) => { if (ev.persisted) reconnectNow(); });

  // Backoff 0.3, 0.6, 1.2 … 8 s with jitter; if the player moved meanwhile, go there at once.
  function scheduleReconnect() {
    if (retryTimer) return;
    if (chat.baseUrl !== player.baseUrl) { retryTimer = setTimeout(connect, 0); return; }
    const delay = Math.min(300 * 2 ** attempts, 8000) * (0.75 + Math.random() * 0.5);
    attempts++;
    retryTimer = setTimeout(connect, delay);
  }
  function reconnectNow() { attempts = 0; connect(); }

  // The chat follows the player to its new broadcast after a failover.
  player.events.addEventListener('broadcast', () => {
    if (chat.baseUrl !== player.baseUrl) reconnectNow();
  });

  // ---- sending ------------------------------------------------------------------------------------
  el.chatForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = el.input.value;
    if (!session) { showError(el.chatError, CHAT_ERRORS.login_required); el.name.focus(); return; }
    if (!text.trim()) { showError(el.chatError, CHAT_ERRORS.empty); return; }
    if (charCount(text) > MAX_CHARS) { showError(el.chatError, CHAT_ERRORS.too_long); return; }
    showError(el.chatError, '');
    const id = newId('');
    chat.pending.set(id, { text, li: renderPending(id, text), timer: null });
    send({ type: 'send', id, text }); // else queued: sent after the next welcome
    el.input.value = '';
  });

  function modOp(op, what) {
    const id = newId('op');
    chat.ops.set(id, what);
    if (!send({ ...op, id })) {
      chat.ops.delete(id);
      showError(el.chatError, `Could not ${what}: chat is not connected.`);
    }
  }

  renderAccount();
  renderChatState();
  checkSession();
  connect();
})();
