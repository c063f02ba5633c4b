/* trioq live dashboard.
 *
 * Plain JS, no build step, no external resources.  Data flow:
 *   - initial load through the JSON endpoints (/api/stats, /api/workers, /api/jobs,
 *     /api/queues, /api/security, /api/tasks, /api/timeseries);
 *   - live updates through server-sent events (/api/events: `job`, `worker`, `stats`);
 *   - light, throttled re-fetches of aggregate endpoints (tasks, queues) when events
 *     suggest they changed, plus a gentle 15 s safety-net refresh.
 * The job log never loads everything: pages of PAGE_SIZE via next_cursor, and at most
 * MAX_ROWS rows in the DOM.
 */
(function () {
  'use strict';

  // ------------------------------------------------------------------ constants
  var PAGE_SIZE = 50;
  var MAX_ROWS = 300;            // job rows kept in the DOM
  var SPILL_MAX = 2000;          // trimmed-from-bottom jobs kept in memory for "Load more"
  var SAFETY_REFRESH_MS = 15000; // gentle aggregate refresh
  var TASKS_THROTTLE_MS = 10000;
  var QUEUES_THROTTLE_MS = 5000;
  var WORKERS_THROTTLE_MS = 1000;
  var WORKERS_REFRESH_MS = 5000; // heartbeats: re-read at least this often while live
  var STALE_STREAM_MS = 30000;   // no SSE message for this long -> reconnect
  var TIMESERIES_KEEP_S = 660;
  var TOKEN_KEY = 'trioq-token';
  var STATES = ['queued', 'scheduled', 'running', 'completed', 'dead', 'cancelled'];
  var STATE_COLORS = {
    queued: '#4c9aff', scheduled: '#a371f7', running: '#d29922',
    completed: '#3fb950', dead: '#f85149', cancelled: '#7d8590'
  };
  var WORKER_STATUSES = ['idle', 'busy', 'quiet', 'stopping'];
  var SERIES = {
    completed: { color: '#3fb950', label: 'completed/s' },
    failed: { color: '#f85149', label: 'failed/s' },
    submitted: { color: '#4c9aff', label: 'submitted/s' },
    p50: { color: '#39c5cf', label: 'p50' },
    p99: { color: '#a371f7', label: 'p99' }
  };

  // ------------------------------------------------------------------ helpers
  function $(id) { return document.getElementById(id); }

  function h(tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) {
      for (var k in attrs) {
        if (!Object.prototype.hasOwnProperty.call(attrs, k)) continue;
        var v = attrs[k];
        if (v === null || v === undefined || v === false) continue;
        if (k === 'class') node.className = v;
        else if (k === 'text') node.textContent = v;
        else if (k === 'onclick') node.addEventListener('click', v);
        else if (k === 'title') node.title = v;
        else node.setAttribute(k, v === true ? '' : v);
      }
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
    }
    return node;
  }

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c];
    });
  }

  function isNum(x) { return typeof x === 'number' && isFinite(x); }
  function nowS() { return Date.now() / 1000; }
  function pad2(n) { return (n < 10 ? '0' : '') + n; }

  function fmtInt(n) { return isNum(n) ? String(Math.round(n)) : '–'; }
  function fmtCompact(n) {
    if (!isNum(n)) return '–';
    var a = Math.abs(n);
    if (a >= 1e9) return (n / 1e9).toFixed(a >= 1e10 ? 0 : 1) + 'G';
    if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 0 : 1) + 'M';
    if (a >= 1e4) return (n / 1e3).toFixed(a >= 1e5 ? 0 : 1) + 'k';
    if (a >= 100 || Math.round(n) === n) return String(Math.round(n));
    return n.toFixed(a >= 10 ? 1 : 2);
  }
  function fmtRate(n) {
    if (!isNum(n)) return '–';
    if (n === 0) return '0';
    if (n >= 100) return String(Math.round(n));
    if (n >= 10) return n.toFixed(1);
    return n.toFixed(2).replace(/\.?0+$/, '');
  }
  function fmtMs(ms) {
    if (!isNum(ms)) return '–';
    if (ms >= 60000) return (ms / 60000).toFixed(1) + ' min';
    if (ms >= 10000) return (ms / 1000).toFixed(1) + ' s';
    if (ms >= 1000) return (ms / 1000).toFixed(2) + ' s';
    if (ms >= 100) return Math.round(ms) + ' ms';
    if (ms >= 10) return ms.toFixed(1) + ' ms';
    return ms.toFixed(2) + ' ms';
  }
  function fmtDuration(sec) {
    if (!isNum(sec)) return '–';
    if (sec < 0) sec = 0;
    if (sec < 1) return Math.round(sec * 1000) + ' ms';
    if (sec < 60) return (sec < 10 ? sec.toFixed(2) : sec.toFixed(1)) + ' s';
    if (sec < 3600) return Math.floor(sec / 60) + 'm ' + pad2(Math.floor(sec % 60)) + 's';
    if (sec < 86400) return Math.floor(sec / 3600) + 'h ' + pad2(Math.floor((sec % 3600) / 60)) + 'm';
    return Math.floor(sec / 86400) + 'd ' + Math.floor((sec % 86400) / 3600) + 'h';
  }
  function fmtAge(sec) {
    if (!isNum(sec)) return '–';
    if (sec < 0) sec = 0;
    if (sec < 1) return 'now';
    if (sec < 60) return Math.floor(sec) + 's';
    if (sec < 3600) return Math.floor(sec / 60) + 'm ' + pad2(Math.floor(sec % 60)) + 's';
    if (sec < 86400) return Math.floor(sec / 3600) + 'h ' + pad2(Math.floor((sec % 3600) / 60)) + 'm';
    return Math.floor(sec / 86400) + 'd ' + Math.floor((sec % 86400) / 3600) + 'h';
  }
  function fmtAgo(ts) {
    if (!isNum(ts)) return '–';
    var d = nowS() - ts;
    if (d < 1.5) return 'just now';
    return fmtAge(d) + ' ago';
  }
  function fmtClock(ts) {
    if (!isNum(ts)) return '–';
    var d = new Date(ts * 1000);
    var t = pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
    var today = new Date();
    if (d.toDateString() !== today.toDateString()) {
      return d.toLocaleDateString(undefined, { month: 'short', day: 'numeric' }) + ' ' + t;
    }
    return t;
  }
  function fmtFull(ts) {
    if (!isNum(ts)) return '–';
    var d = new Date(ts * 1000);
    return d.getFullYear() + '-' + pad2(d.getMonth() + 1) + '-' + pad2(d.getDate()) + ' ' +
      pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds()) + '  (' + fmtAgoOrIn(ts) + ')';
  }
  function fmtStamp(ts) {
    if (!isNum(ts)) return '';
    var d = new Date(ts * 1000);
    return d.getFullYear() + '-' + pad2(d.getMonth() + 1) + '-' + pad2(d.getDate()) + ' ' +
      pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
  }
  function fmtAgoOrIn(ts) {
    var d = ts - nowS();
    if (Math.abs(d) < 1.5) return 'now';
    return d > 0 ? 'in ' + fmtAge(d) : fmtAge(-d) + ' ago';
  }
  function shortId(id) {
    id = String(id == null ? '' : id);
    return id.length > 10 ? id.slice(0, 8) : id;
  }
  function compactJson(v, max) {
    if (v === undefined) return '';
    var s;
    try { s = typeof v === 'string' ? v : JSON.stringify(v); } catch (e) { s = String(v); }
    if (s === undefined) s = '';
    max = max || 120;
    return s.length > max ? s.slice(0, max - 1) + '…' : s;
  }
  function prettyJson(v) {
    if (v === undefined) return '';
    try { return JSON.stringify(v, null, 2); } catch (e) { return String(v); }
  }
  function progressPct(p) {
    if (!p || !isNum(p.value)) return null;
    var v = p.value <= 1 ? p.value * 100 : p.value;
    return Math.max(0, Math.min(100, v));
  }
  function debounce(fn, ms) {
    var t = null;
    return function () {
      var args = arguments, self = this;
      clearTimeout(t);
      t = setTimeout(function () { fn.apply(self, args); }, ms);
    };
  }

  // Throttled "refresh soon" helper: at most one call per `ms`, trailing call guaranteed.
  function throttled(fn, ms) {
    var last = 0, timer = null, running = false, again = false;
    function run() {
      timer = null;
      if (running) { again = true; return; }
      running = true; last = Date.now();
      Promise.resolve().then(fn).catch(function () {}).then(function () {
        running = false;
        if (again) { again = false; schedule(); }
      });
    }
    function schedule() {
      if (timer) return;
      var wait = Math.max(0, last + ms - Date.now());
      timer = setTimeout(run, wait);
    }
    return schedule;
  }

  // ------------------------------------------------------------------ toasts
  function toast(msg, kind, code) {
    var box = $('toasts');
    var t = h('div', { class: 'toast ' + (kind || ''), 'data-testid': 'toast', role: kind === 'err' ? 'alert' : 'status' },
      code ? h('span', { class: 'code', text: code }) : null, msg);
    box.appendChild(t);
    while (box.children.length > 5) box.removeChild(box.firstChild);
    setTimeout(function () { if (t.parentNode) t.parentNode.removeChild(t); }, kind === 'err' ? 9000 : 4500);
  }

  // ------------------------------------------------------------------ API
  function ApiError(status, code, message) {
    this.status = status; this.code = code; this.message = message;
  }
  ApiError.prototype = Object.create(Error.prototype);
  ApiError.prototype.name = 'ApiError';

  function errorFromBody(status, statusText, data) {
    var code = 'http_' + status, msg = status + ' ' + (statusText || '');
    if (data && typeof data === 'object') {
      var e = data.error;
      if (e && typeof e === 'object') {
        if (e.code) code = String(e.code);
        if (e.message) msg = String(e.message);
      } else if (typeof e === 'string') {
        msg = e;
      } else if (typeof data.detail === 'string') {
        msg = data.detail;
      } else if (typeof data.message === 'string') {
        msg = data.message;
      }
    }
    return new ApiError(status, code, msg.trim());
  }

  function request(method, path, body, token) {
    var headers = { 'Accept': 'application/json' };
    var init = { method: method, headers: headers, cache: 'no-store', credentials: 'same-origin' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    if (token) headers['Authorization'] = 'Bearer ' + token;
    return fetch(path, init).then(function (resp) {
      return resp.text().then(function (text) {
        var data = null;
        if (text) { try { data = JSON.parse(text); } catch (e) { data = null; } }
        if (!resp.ok) throw errorFromBody(resp.status, resp.statusText, data || (text ? { message: text.slice(0, 300) } : null));
        return data;
      });
    }, function (err) {
      throw new ApiError(0, 'network', 'Network error: ' + (err && err.message ? err.message : err));
    });
  }

  function apiGet(path) { return request('GET', path); }

  // Token handling ---------------------------------------------------------
  function getToken() {
    try { return localStorage.getItem(TOKEN_KEY) || ''; } catch (e) { return memToken; }
  }
  var memToken = '';
  function setToken(t) {
    memToken = t || '';
    try {
      if (t) localStorage.setItem(TOKEN_KEY, t); else localStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage unavailable: keep in memory */ }
    updateTokenButton();
  }
  function updateTokenButton() {
    var b = $('token-button');
    var has = !!getToken();
    b.textContent = has ? 'Token set' : 'Set token';
    b.classList.toggle('has-token', has);
  }

  var tokenWaiters = [];
  function openTokenDialog(message) {
    $('token-error').textContent = message || '';
    $('token-input').value = getToken();
    $('token-dialog-backdrop').hidden = false;
    setTimeout(function () { $('token-input').focus(); }, 0);
  }
  function closeTokenDialog(token) {
    $('token-dialog-backdrop').hidden = true;
    var waiters = tokenWaiters; tokenWaiters = [];
    waiters.forEach(function (w) { if (token) w.resolve(token); else w.reject(new ApiError(0, 'no_token', 'A token is required for this action.')); });
  }
  function ensureToken() {
    var t = getToken();
    if (t) return Promise.resolve(t);
    return new Promise(function (resolve, reject) {
      tokenWaiters.push({ resolve: resolve, reject: reject });
      if ($('token-dialog-backdrop').hidden) openTokenDialog('');
    });
  }

  // Authenticated mutation. Resolves with the JSON body; shows errors as toasts.
  function mutate(method, path, body, opts) {
    opts = opts || {};
    return ensureToken().then(function (token) {
      return request(method, path, body, token);
    }).then(function (data) {
      if (opts.success) toast(opts.success, 'ok');
      return data;
    }, function (err) {
      if (err && (err.status === 401 || err.status === 403)) {
        setToken('');
        err.message = (err.status === 401 ? 'Unauthorized' : 'Forbidden') + ': ' + err.message + ' (token cleared)';
      }
      if (!opts.quiet && !(err && err.code === 'no_token')) toast((opts.label ? opts.label + ' failed: ' : '') + err.message, 'err', err.code);
      throw err;
    });
  }

  function withBusy(btn, promise) {
    if (btn) { btn.disabled = true; btn.classList.add('busy'); }
    return promise.then(function (v) {
      if (btn) { btn.disabled = false; btn.classList.remove('busy'); }
      return v;
    }, function (e) {
      if (btn) { btn.disabled = false; btn.classList.remove('busy'); }
      throw e;
    });
  }

  function panelError(containerId, err) {
    var c = $(containerId);
    if (!c) return;
    var msg = 'Failed to load: ' + (err && err.message ? err.message : err);
    var box = c.querySelector(':scope > .panel-error');
    if (!box) {
      box = h('div', { class: 'panel-error', 'data-testid': 'panel-error', role: 'alert' });
      var head = c.querySelector(':scope > .panel-head');
      c.insertBefore(box, head ? head.nextSibling : c.firstChild);
    }
    box.textContent = msg;
  }
  function clearPanelError(containerId) {
    var c = $(containerId);
    var box = c && c.querySelector(':scope > .panel-error');
    if (box) box.parentNode.removeChild(box);
  }

  // ------------------------------------------------------------------ state
  var state = {
    stats: null,
    workers: new Map(),          // id -> worker
    queues: [],
    queuesFetchedAt: 0,
    tasks: { tasks: [], known: [] },
    security: null,
    points: [],                  // timeseries points sorted by t
    range: 300,
    lastSubmittedTotal: null
  };

  // ------------------------------------------------------------------ stats
  var CARD_KEYS = ['queue_size', 'workers', 'idle', 'busy', 'completed', 'failed', 'requeued', 'total'];

  function setCard(key, value, sub) {
    var v = $('stat-' + key);
    var s = isNum(value) ? String(Math.round(value)) : '–';
    if (v.textContent !== s) v.textContent = s;
    v.setAttribute('data-value', isNum(value) ? String(value) : '');
    if (key === 'failed') v.classList.toggle('nonzero', isNum(value) && value > 0);
    var subEl = $('sub-' + key);
    if (subEl && sub !== undefined && subEl.textContent !== sub) subEl.textContent = sub;
  }

  function applyStats(s) {
    if (!s || typeof s !== 'object') return;
    state.stats = s;
    lastFetch.stats = Date.now();
    var w = s.workers || {}, j = s.jobs || {};
    setCard('queue_size', s.queue_size, isNum(j.scheduled) ? '+' + j.scheduled + ' scheduled' : '');
    setCard('workers', w.total, workersSub());
    setCard('idle', w.idle, w.total ? Math.round(100 * (w.idle || 0) / w.total) + '% of workers' : '');
    setCard('busy', w.busy, w.total ? Math.round(100 * (w.busy || 0) / w.total) + '% utilised' : '');
    var r = recentRates();
    setCard('completed', j.completed, joinSub(r ? fmtRate(r.completed) + '/s' : '', isNum(s.completed_total) ? fmtCompact(s.completed_total) + ' total' : ''));
    setCard('failed', j.dead, joinSub(r ? fmtRate(r.failed) + '/s' : '', isNum(s.failed_total) ? fmtCompact(s.failed_total) + (s.failed_total === 1 ? ' failure' : ' failures') : ''));
    setCard('requeued', s.requeued, isNum(j.cancelled) ? j.cancelled + ' cancelled' : '');
    setCard('total', s.total, isNum(s.submitted_total) ? fmtCompact(s.submitted_total) + ' submitted' : '');
    $('uptime').textContent = isNum(s.uptime) ? 'up ' + fmtAge(s.uptime) : '';
    var sb = $('store-badge');
    var unhealthy = s.store && s.store.healthy === false;
    sb.hidden = !unhealthy;
    if (unhealthy) sb.title = 'Job store is failing: ' + (s.store.description || '');
    var rb = $('restore-badge');
    rb.hidden = !s.restoring;
    if (s.restoring) rb.title = (s.restore_pending ? fmtCompact(s.restore_pending) : 'Some') + ' unfinished jobs of the journal are not loaded yet (a restart; the broker serves meanwhile)';
    $('stop-badge').hidden = !s.stopping;
    var dc = $('dead-count');
    var dtxt = isNum(j.dead) && j.dead > 0 ? fmtCompact(j.dead) : '';
    if (dc.textContent !== dtxt) dc.textContent = dtxt;
    renderStatusChart();
    updateJobCount();
    if (isNum(s.submitted_total)) {
      if (state.lastSubmittedTotal !== null && s.submitted_total !== state.lastSubmittedTotal) refreshTasksSoon();
      state.lastSubmittedTotal = s.submitted_total;
    }
  }

  function joinSub(a, b) { return a && b ? a + ' · ' + b : a || b; }
  // mean rates over the last 10 timeseries points
  function recentRates() {
    var pts = state.points.slice(-10);
    if (!pts.length) return null;
    var c = 0, f = 0;
    pts.forEach(function (p) { c += +p.completed || 0; f += +p.failed || 0; });
    return { completed: c / pts.length, failed: f / pts.length };
  }

  function workersSub() {
    var w = (state.stats && state.stats.workers) || {};
    var st = countStatuses();
    if (isNum(w.capacity)) return joinSub(w.capacity + ' slots' + (isNum(w.free) ? ', ' + w.free + ' free' : ''), st === 'all active' ? '' : st);
    return st;
  }
  function countStatuses() {
    var c = { quiet: 0, stopping: 0 };
    state.workers.forEach(function (w) { if (c[w.status] !== undefined) c[w.status]++; });
    var parts = [];
    if (c.quiet) parts.push(c.quiet + ' quiet');
    if (c.stopping) parts.push(c.stopping + ' stopping');
    return parts.join(' · ') || (state.workers.size ? 'all active' : '');
  }

  function loadStats() {
    return apiGet('/api/stats').then(applyStats, function (e) { toastOnce('stats', 'Could not load /api/stats: ' + e.message); });
  }

  var toastedKeys = {};
  function toastOnce(key, msg) {
    if (toastedKeys[key] && Date.now() - toastedKeys[key] < 60000) return;
    toastedKeys[key] = Date.now();
    toast(msg, 'err');
  }

  // ------------------------------------------------------------------ security
  function applySecurity(sec) {
    state.security = sec || {};
    var badge = $('tls-badge');
    var tls = !!(sec && sec.tls);
    badge.setAttribute('data-tls', tls ? 'true' : 'false');
    if (tls) {
      var m = /(\d+(?:\.\d+)?)/.exec(String(sec.tls_version || ''));
      badge.textContent = 'TLS' + (m ? ' ' + m[1] : '');
      badge.className = 'badge badge-ok';
      badge.title = 'Broker connections are encrypted (' + (sec.tls_version || 'TLS') + ')';
    } else {
      badge.textContent = 'NO TLS';
      badge.className = 'badge badge-bad';
      badge.title = 'Broker connections are NOT encrypted';
    }
    var panel = $('security-panel');
    function set(field, text, cls) {
      var dd = panel.querySelector('[data-field="' + field + '"]');
      dd.textContent = text;
      dd.className = cls || '';
    }
    var cert = (sec && sec.certificate) || null;
    set('tls_version', tls ? String(sec.tls_version || 'enabled') : 'disabled', tls ? 'good' : 'bad');
    set('protocol_version', sec && sec.protocol_version != null ? String(sec.protocol_version) : '–');
    set('subject', cert && cert.subject ? String(cert.subject) : '–');
    set('issuer', cert && cert.issuer ? String(cert.issuer) : '–');
    if (cert && cert.not_after) {
      var t = Date.parse(cert.not_after), cls = '', extra = '';
      if (!isNaN(t)) {
        var days = (t - Date.now()) / 86400000;
        if (days < 0) { cls = 'bad'; extra = ' (expired)'; }
        else { extra = ' (in ' + Math.floor(days) + ' days)'; cls = days < 14 ? 'warn' : ''; }
      }
      set('not_after', String(cert.not_after) + extra, cls);
    } else set('not_after', '–');
    set('sans', cert && cert.sans && cert.sans.length ? cert.sans.join(', ') : '–');
    set('port', sec && sec.port != null ? String(sec.port) : '–');
    var httpTxt = '–';
    if (sec && (sec.http_port != null || sec.http_tls != null)) {
      httpTxt = (sec.http_tls ? 'HTTPS' : 'HTTP') + (sec.http_port != null ? ' on port ' + sec.http_port : '');
    } else if (typeof location !== 'undefined') {
      httpTxt = location.protocol === 'https:' ? 'HTTPS' : 'HTTP';
    }
    set('http', httpTxt, sec && sec.http_tls === false ? 'warn' : '');
    set('client_auth', sec && sec.client_auth != null ? String(sec.client_auth) : '–');
  }

  function loadSecurity() {
    return apiGet('/api/security').then(function (s) { clearPanelError('security-section'); applySecurity(s); },
      function (e) { panelError('security-section', e); });
  }

  // ------------------------------------------------------------------ workers
  // The broker sends worker events only when a worker joins, leaves or drains; a worker's
  // current jobs, counts and heartbeat are re-read (throttled) when job events or the
  // stats suggest they changed. Joins and losses that arrive while a snapshot is being
  // fetched are replayed on top of it, so an older snapshot cannot resurrect a lost worker.
  var workerFetches = 0;
  var workerEventsDuringFetch = [];
  function isGoneEvent(ev) { return ev === 'lost' || ev === 'left' || ev === 'removed'; }
  function loadWorkers() {
    workerFetches++;
    var from = workerEventsDuringFetch.length;
    lastFetch.workers = Date.now();
    return apiGet('/api/workers').then(function (data) {
      clearPanelError('workers-panel');
      var m = new Map();
      ((data && data.workers) || []).forEach(function (w) { m.set(String(w.id), w); });
      workerEventsDuringFetch.slice(from).forEach(function (w) {
        var id = String(w.id);
        if (isGoneEvent(w.event)) m.delete(id);
        else if (!m.has(id)) { var copy = Object.assign({}, w); delete copy.event; m.set(id, copy); }
      });
      state.workers = m;
      renderWorkers();
    }, function (e) { panelError('workers-panel', e); }).then(function () {
      if (--workerFetches === 0) workerEventsDuringFetch = [];
    });
  }
  var refreshWorkersSoon = throttled(loadWorkers, WORKERS_THROTTLE_MS);

  function workerLabel(id) {
    if (id == null) return '';
    var w = state.workers.get(String(id));
    return w && w.name ? w.name : String(id);
  }

  function renderWorkers() {
    var body = $('workers-body');
    var list = Array.from(state.workers.values());
    list.sort(function (a, b) { return String(a.name || a.id).localeCompare(String(b.name || b.id), undefined, { numeric: true }); });
    var existing = new Map();
    Array.prototype.forEach.call(body.rows, function (tr) { existing.set(tr.getAttribute('data-worker-id'), tr); });
    var frag = document.createDocumentFragment();
    list.forEach(function (w) {
      var id = String(w.id);
      var tr = existing.get(id);
      if (tr) existing.delete(id); else tr = h('tr', { 'data-worker-id': id });
      fillWorkerRow(tr, w);
      frag.appendChild(tr);
    });
    existing.forEach(function (tr) { tr.parentNode && tr.parentNode.removeChild(tr); });
    body.appendChild(frag);
    $('workers-empty').hidden = list.length > 0;
    $('workers-count').textContent = list.length ? String(list.length) : '';
    if (state.stats) setCard('workers', (state.stats.workers || {}).total, workersSub());
  }

  function fillWorkerRow(tr, w) {
    var status = WORKER_STATUSES.indexOf(w.status) >= 0 ? w.status : 'idle';
    tr.setAttribute('data-status', String(w.status || ''));
    var jobs = Array.isArray(w.current_jobs) ? w.current_jobs : [];
    var jobCell = h('td', null);
    if (jobs.length) {
      var chips = h('div', { class: 'chips' });
      jobs.slice(0, 2).forEach(function (jid) {
        chips.appendChild(h('a', { class: 'chip', title: 'Open job ' + jid, 'data-job-link': String(jid), text: shortId(jid) }));
      });
      if (jobs.length > 2) chips.appendChild(h('span', { class: 'chip chip-more', title: jobs.slice(2).join('\n'), text: '+' + (jobs.length - 2) }));
      jobCell.appendChild(chips);
    } else jobCell.appendChild(h('span', { class: 'muted', text: '—' }));
    var tasks = Array.isArray(w.tasks) ? w.tasks : [];
    var taskTxt = tasks.length ? tasks.join(', ') : '—';
    var queues = Array.isArray(w.queues) && w.queues.length ? 'queues: ' + w.queues.join(', ') : '';
    var stopping = w.status === 'stopping';
    tr.replaceChildren(
      h('td', { title: 'id: ' + w.id + (isNum(w.connected_at) ? '\nconnected ' + fmtFull(w.connected_at) : '') },
        h('div', { class: 'wname', text: String(w.name || w.id) }),
        h('div', { class: 'sub mono', 'data-field': 'address', text: String(w.address || '—') })),
      h('td', null, h('span', { class: 'pill pill-' + status, 'data-testid': 'worker-status' }, h('i', { class: 'sdot s-' + status }), String(w.status || 'unknown')),
        isNum(w.completed) || isNum(w.failed) ? h('div', { class: 'sub', title: 'jobs completed / failed on this worker' },
          fmtCompact(w.completed || 0) + ' done' + (w.failed ? ' · ' + fmtCompact(w.failed) + ' failed' : '')) : null),
      jobCell,
      h('td', { class: 'num' }, (jobs.length + '/' + (isNum(w.concurrency) ? w.concurrency : '?'))),
      h('td', { class: 'trunc', title: taskTxt + (queues ? '\n' + queues : '') }, h('span', { text: taskTxt })),
      h('td', null, h('span', { class: 'rel-time', 'data-ts': isNum(w.last_heartbeat) ? String(w.last_heartbeat) : '', title: fmtFull(w.last_heartbeat), text: fmtAgo(w.last_heartbeat) })),
      h('td', { class: 'actions' },
        h('button', { type: 'button', class: 'btn btn-xs', 'data-testid': 'worker-quiet', 'data-action': 'quiet', disabled: w.status === 'quiet' || stopping, title: 'Stop taking new jobs' }, 'Quiet'),
        h('button', { type: 'button', class: 'btn btn-xs btn-danger', 'data-testid': 'worker-stop', 'data-action': 'stop', disabled: stopping, title: 'Finish current jobs and stop' }, 'Stop'))
    );
  }

  function onWorkerEvent(w) {
    if (!w || w.id == null) return;
    var id = String(w.id);
    var ev = w.event;
    if (workerFetches) workerEventsDuringFetch.push(w);
    if (isGoneEvent(ev)) {
      state.workers.delete(id);
    } else {
      var prev = state.workers.get(id) || {};
      var next = Object.assign({}, prev, w);
      delete next.event;
      state.workers.set(id, next);
    }
    scheduleWorkersRender();
  }
  var workersRenderTimer = null;
  function scheduleWorkersRender() {
    if (workersRenderTimer) return;
    workersRenderTimer = setTimeout(function () { workersRenderTimer = null; renderWorkers(); }, 100);
  }

  function onWorkersClick(e) {
    var link = e.target.closest('[data-job-link]');
    if (link) { openDetail(link.getAttribute('data-job-link')); return; }
    var btn = e.target.closest('button[data-action]');
    if (!btn) return;
    var tr = btn.closest('tr[data-worker-id]');
    var id = tr.getAttribute('data-worker-id');
    var action = btn.getAttribute('data-action');
    var name = workerLabel(id);
    withBusy(btn, mutate('POST', '/api/workers/' + encodeURIComponent(id) + '/' + action, undefined,
      { label: action === 'quiet' ? 'Quiet ' + name : 'Stop ' + name, success: (action === 'quiet' ? 'Quieted ' : 'Stopping ') + name }))
      .then(function (data) {
        if (data && data.id != null && data.status) onWorkerEvent(data);
        else loadWorkers();
      }, function () {});
  }

  // ------------------------------------------------------------------ queues
  var lastFetch = { queues: 0, tasks: 0, stats: 0, workers: 0 };
  function loadQueues() {
    lastFetch.queues = Date.now();
    return apiGet('/api/queues').then(function (data) {
      clearPanelError('queues-section');
      state.queues = (data && data.queues) || [];
      state.queuesFetchedAt = nowS();
      renderQueues();
    }, function (e) { panelError('queues-section', e); });
  }
  var refreshQueuesSoon = throttled(loadQueues, QUEUES_THROTTLE_MS);

  function renderQueues() {
    var body = $('queues-body');
    var frag = document.createDocumentFragment();
    var opts = document.createDocumentFragment();
    state.queues.forEach(function (q) {
      var name = String(q.name);
      var bp = q.by_priority || {};
      var max = 0, p;
      for (p = 1; p <= 10; p++) max = Math.max(max, +bp[p] || +bp[String(p)] || 0);
      var bars = h('span', { class: 'pbars' });
      var tip = [];
      for (p = 1; p <= 10; p++) {
        var n = +bp[String(p)] || 0;
        var ht = n ? Math.max(3, Math.round(20 * n / max)) : 2;
        bars.appendChild(h('i', { class: n ? (p <= 2 ? 'hi' : p <= 4 ? 'mid' : '') : 'zero', style: 'height:' + ht + 'px', title: 'P' + p + ': ' + n }));
        if (n) tip.push('P' + p + ': ' + n);
      }
      bars.title = tip.join('\n') || 'empty';
      var paused = !!q.paused;
      var age = isNum(q.oldest_age) ? q.oldest_age + (q.depth > 0 ? Math.max(0, nowS() - state.queuesFetchedAt) : 0) : null;
      var tr = h('tr', { 'data-queue': name, 'data-paused': paused ? 'true' : 'false' },
        h('td', null, h('span', { text: name }), paused ? h('span', { class: 'chip tag-paused', 'data-testid': 'queue-paused', text: 'paused' }) : null),
        h('td', { class: 'num' }, fmtInt(q.depth)),
        h('td', null, h('span', { class: 'queue-age', 'data-age': isNum(q.oldest_age) ? String(q.oldest_age) : '' , 'data-depth': String(q.depth || 0), text: age === null ? '—' : fmtAge(age) })),
        h('td', null, bars),
        h('td', { class: 'actions' }, paused
          ? h('button', { type: 'button', class: 'btn btn-xs', 'data-testid': 'queue-resume', 'data-action': 'resume' }, 'Resume')
          : h('button', { type: 'button', class: 'btn btn-xs btn-warn', 'data-testid': 'queue-pause', 'data-action': 'pause' }, 'Pause'))
      );
      frag.appendChild(tr);
      opts.appendChild(h('option', { value: name }));
    });
    body.replaceChildren(frag);
    $('queue-options').replaceChildren(opts);
    $('queues-empty').hidden = state.queues.length > 0;
    $('queues-count').textContent = state.queues.length ? String(state.queues.length) : '';
  }

  function onQueuesClick(e) {
    var btn = e.target.closest('button[data-action]');
    if (!btn) return;
    var name = btn.closest('tr[data-queue]').getAttribute('data-queue');
    var action = btn.getAttribute('data-action');
    withBusy(btn, mutate('POST', '/api/queues/' + encodeURIComponent(name) + '/' + action, undefined,
      { label: (action === 'pause' ? 'Pause ' : 'Resume ') + name, success: 'Queue ' + name + (action === 'pause' ? ' paused' : ' resumed') }))
      .then(function () { loadQueues(); }, function () {});
  }

  // ------------------------------------------------------------------ tasks
  function loadTasks() {
    lastFetch.tasks = Date.now();
    return apiGet('/api/tasks').then(function (data) {
      clearPanelError('task-panel');
      state.tasks = { tasks: (data && data.tasks) || [], known: (data && data.known) || [] };
      renderTaskChart();
      renderKnownTasks();
    }, function (e) { panelError('task-panel', e); });
  }
  var refreshTasksSoon = throttled(loadTasks, TASKS_THROTTLE_MS);

  var knownSig = '';
  function renderKnownTasks() {
    var names = state.tasks.known.slice();
    state.tasks.tasks.forEach(function (t) { if (names.indexOf(t.name) < 0) names.push(t.name); });
    var sig = names.join('\n');
    if (sig === knownSig) return;
    knownSig = sig;
    var sel = $('submit-task-select');
    var cur = sel.value;
    var frag = document.createDocumentFragment();
    frag.appendChild(h('option', { value: '' }, state.tasks.known.length ? 'Known tasks…' : 'No known tasks'));
    state.tasks.known.forEach(function (n) { frag.appendChild(h('option', { value: String(n) }, String(n))); });
    sel.replaceChildren(frag);
    if (cur && state.tasks.known.indexOf(cur) >= 0) sel.value = cur;
    var dl = document.createDocumentFragment();
    names.forEach(function (n) { dl.appendChild(h('option', { value: String(n) })); });
    $('task-options').replaceChildren(dl);
  }

  // ------------------------------------------------------------------ charts: status donut
  var statusSig = '';
  function renderStatusChart() {
    var box = $('status-chart');
    var j = (state.stats && state.stats.jobs) || null;
    if (!j) { if (!box.firstChild) box.appendChild(h('div', { class: 'empty', text: 'No data yet.' })); return; }
    var sig = STATES.map(function (s) { return j[s] || 0; }).join(',');
    if (sig === statusSig) return;
    statusSig = sig;
    var total = 0;
    STATES.forEach(function (s) { total += +j[s] || 0; });
    var R = 52, C = 2 * Math.PI * R, off = 0, arcs = '';
    if (total > 0) {
      STATES.forEach(function (s) {
        var v = +j[s] || 0;
        if (!v) return;
        var len = C * v / total;
        var gap = len > 3 ? 1.2 : 0;
        arcs += '<circle cx="70" cy="70" r="' + R + '" fill="none" stroke="' + STATE_COLORS[s] + '" stroke-width="18" ' +
          'stroke-dasharray="' + Math.max(0, len - gap).toFixed(2) + ' ' + (C - Math.max(0, len - gap)).toFixed(2) + '" ' +
          'stroke-dashoffset="' + (-off).toFixed(2) + '" transform="rotate(-90 70 70)" data-state="' + s + '"><title>' + s + ': ' + v + '</title></circle>';
        off += len;
      });
    } else {
      arcs = '<circle cx="70" cy="70" r="' + R + '" fill="none" stroke="#262e39" stroke-width="18"></circle>';
    }
    var svg = '<svg viewBox="0 0 140 140" role="img" aria-label="Jobs by state">' + arcs +
      '<text class="donut-total" x="70" y="72" text-anchor="middle">' + esc(fmtCompact(total)) + '</text>' +
      '<text class="donut-sub" x="70" y="88" text-anchor="middle">jobs</text></svg>';
    var legend = '<ul class="legend">' + STATES.map(function (s) {
      var v = +j[s] || 0;
      return '<li data-state="' + s + '" data-testid="status-count-' + s + '" data-value="' + v + '" title="' + s + ': ' + v + (total ? ' (' + (100 * v / total).toFixed(1) + '%)' : '') + '"><i class="sdot st-' + s + '"></i>' +
        '<span class="name">' + s + '</span><span class="val" title="' + (total ? (100 * v / total).toFixed(1) + '% of jobs' : '') + '">' + esc(fmtInt(v)) + '</span></li>';
    }).join('') + '</ul>';
    box.innerHTML = '<div class="donut-wrap">' + svg + legend + '</div>';
  }

  // ------------------------------------------------------------------ charts: tasks
  function renderTaskChart() {
    var box = $('task-chart');
    var tasks = (state.tasks.tasks || []).slice();
    tasks.sort(function (a, b) { return (b.total || 0) - (a.total || 0); });
    var shown = tasks.slice(0, 8);
    $('task-chart-note').textContent = tasks.length > shown.length ? 'top ' + shown.length + ' of ' + tasks.length : '';
    if (!shown.length) { box.innerHTML = '<div class="empty">No tasks yet.</div>'; return; }
    var W = Math.max(220, box.clientWidth - 24), rowH = 22, labelW = Math.min(170, Math.round(W * 0.46)), numW = 40;
    var maxChars = Math.max(6, Math.floor((labelW - 10) / 6.1));
    var barW = Math.max(40, W - labelW - numW - 8);
    var max = 0;
    shown.forEach(function (t) { max = Math.max(max, t.total || 0); });
    var segs = ['completed', 'running', 'queued', 'dead', 'cancelled'];
    var out = '';
    shown.forEach(function (t, i) {
      var y = i * rowH;
      var name = String(t.name);
      var label = name;
      if (label.length > maxChars && label.lastIndexOf('.') > 0) label = label.slice(label.lastIndexOf('.') + 1);
      if (label.length > maxChars) label = label.slice(0, maxChars - 1) + '…';
      var x = labelW;
      out += '<g data-task="' + esc(name) + '"><title>' + esc(name) + '\n' + segs.map(function (s) { return s + ': ' + (t[s] || 0); }).join('\n') + '\ntotal: ' + (t.total || 0) + '</title>';
      out += '<text class="svg-label" x="' + (labelW - 8) + '" y="' + (y + 14) + '" text-anchor="end" style="fill:#c9d1d9">' + esc(label) + '</text>';
      out += '<rect x="' + labelW + '" y="' + (y + 4) + '" width="' + barW + '" height="13" rx="2" fill="#1b222c"></rect>';
      segs.forEach(function (s) {
        var v = +t[s] || 0;
        if (!v || !max) return;
        var w = barW * v / max;
        out += '<rect x="' + x.toFixed(2) + '" y="' + (y + 4) + '" width="' + Math.max(0.8, w).toFixed(2) + '" height="13" fill="' + STATE_COLORS[s] + '"></rect>';
        x += w;
      });
      out += '<text class="svg-label" x="' + (labelW + barW + 6) + '" y="' + (y + 14) + '">' + esc(fmtCompact(t.total || 0)) + '</text></g>';
    });
    var legend = '<div class="task-legend">' + segs.map(function (s) { return '<span><i class="sdot st-' + s + '"></i>' + s + '</span>'; }).join('') + '</div>';
    box.innerHTML = legend + '<svg viewBox="0 0 ' + W + ' ' + (shown.length * rowH + 2) + '" height="' + (shown.length * rowH + 2) + '" role="img" aria-label="Jobs per task">' + out + '</svg>';
  }

  // ------------------------------------------------------------------ charts: throughput & latency
  function loadTimeseries() {
    return apiGet('/api/timeseries').then(function (data) {
      clearPanelError('throughput-panel');
      var pts = ((data && data.points) || []).filter(function (p) { return p && isNum(p.t); });
      pts.sort(function (a, b) { return a.t - b.t; });
      // keep points that arrived by SSE after the snapshot was taken
      var lastT = pts.length ? pts[pts.length - 1].t : -Infinity;
      state.points.forEach(function (p) { if (p.t > lastT) pts.push(p); });
      state.points = pts;
      trimPoints();
      scheduleThroughputRender();
    }, function (e) { panelError('throughput-panel', e); });
  }

  function addPoint(p) {
    if (!p || !isNum(p.t)) return;
    var pts = state.points;
    var n = pts.length;
    if (!n || p.t > pts[n - 1].t) pts.push(p);
    else {
      // replace same-second point or insert in order (rare)
      for (var i = n - 1; i >= 0; i--) {
        if (pts[i].t === p.t) { pts[i] = p; break; }
        if (pts[i].t < p.t) { pts.splice(i + 1, 0, p); break; }
        if (i === 0) pts.unshift(p);
      }
    }
    trimPoints();
    scheduleThroughputRender();
  }
  function trimPoints() {
    var pts = state.points;
    if (!pts.length) return;
    var cutoff = pts[pts.length - 1].t - TIMESERIES_KEEP_S;
    var k = 0;
    while (k < pts.length && pts[k].t < cutoff) k++;
    if (k) pts.splice(0, k);
  }

  var tpTimer = null;
  function scheduleThroughputRender() {
    if (tpTimer) return;
    tpTimer = setTimeout(function () { tpTimer = null; renderThroughput(); }, 60);
  }

  function niceMax(v) {
    if (!isNum(v) || v <= 0) return 1;
    var e = Math.pow(10, Math.floor(Math.log10(v)));
    var f = v / e;
    var n = f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10;
    return n * e;
  }

  var tpGeom = null; // geometry for hover
  function renderThroughput() {
    var box = $('throughput-chart');
    var W = Math.max(300, box.clientWidth - 24);
    var H = Math.max(200, box.clientHeight - 10);
    var pts = state.points;
    var interval = 1;
    var tEnd = pts.length ? pts[pts.length - 1].t : nowS();
    var tStart = tEnd - state.range;
    var vis = pts.filter(function (p) { return p.t >= tStart; });
    renderThroughputLegend(vis);
    var padL = 44, padR = 10, gap = 26;
    var top1 = 8, h1 = Math.round((H - 8 - gap - 20) * 0.58), top2 = top1 + h1 + gap, h2 = H - top2 - 20;
    var plotW = W - padL - padR;
    function X(t) { return padL + plotW * (t - tStart) / (tEnd - tStart || 1); }
    var maxRate = 0, maxLat = 0;
    vis.forEach(function (p) {
      maxRate = Math.max(maxRate, +p.completed || 0, +p.failed || 0, +p.submitted || 0);
      if (isNum(p.latency_p99_ms)) maxLat = Math.max(maxLat, p.latency_p99_ms);
      if (isNum(p.latency_p50_ms)) maxLat = Math.max(maxLat, p.latency_p50_ms);
    });
    var rMax = niceMax(maxRate * 1.08 || 1), lMax = niceMax(maxLat * 1.08 || 1);
    function Y1(v) { return top1 + h1 - h1 * v / rMax; }
    function Y2(v) { return top2 + h2 - h2 * v / lMax; }

    var s = '';
    // grids + y labels
    var i;
    for (i = 0; i <= 4; i++) {
      var v1 = rMax * i / 4, y1 = Y1(v1);
      s += '<line class="grid-line" x1="' + padL + '" x2="' + (W - padR) + '" y1="' + y1.toFixed(1) + '" y2="' + y1.toFixed(1) + '"></line>';
      s += '<text class="svg-label" x="' + (padL - 6) + '" y="' + (y1 + 3.5).toFixed(1) + '" text-anchor="end">' + esc(fmtCompact(v1)) + '</text>';
    }
    for (i = 0; i <= 2; i++) {
      var v2 = lMax * i / 2, y2 = Y2(v2);
      s += '<line class="grid-line" x1="' + padL + '" x2="' + (W - padR) + '" y1="' + y2.toFixed(1) + '" y2="' + y2.toFixed(1) + '"></line>';
      s += '<text class="svg-label" x="' + (padL - 6) + '" y="' + (y2 + 3.5).toFixed(1) + '" text-anchor="end">' + esc(fmtMsShort(v2)) + '</text>';
    }
    s += '<text class="svg-label" x="' + padL + '" y="' + (top1 - 0) + '" dy="-1" style="font-size:9.5px">jobs/s</text>';
    s += '<text class="svg-label" x="' + padL + '" y="' + (top2 - 5) + '" style="font-size:9.5px">latency</text>';
    // x ticks
    var step = state.range <= 60 ? 10 : state.range <= 300 ? 60 : 120;
    var firstTick = Math.ceil(tStart / step) * step;
    for (var tt = firstTick; tt <= tEnd; tt += step) {
      var x = X(tt);
      s += '<line class="grid-line" x1="' + x.toFixed(1) + '" x2="' + x.toFixed(1) + '" y1="' + top1 + '" y2="' + (top2 + h2) + '" style="stroke-dasharray:2 4"></line>';
      var d = new Date(tt * 1000);
      var lbl = pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + (step < 60 ? ':' + pad2(d.getSeconds()) : '');
      s += '<text class="svg-label" x="' + x.toFixed(1) + '" y="' + (top2 + h2 + 14) + '" text-anchor="middle">' + lbl + '</text>';
    }
    s += '<line class="axis-line" x1="' + padL + '" x2="' + (W - padR) + '" y1="' + (top1 + h1) + '" y2="' + (top1 + h1) + '"></line>';
    s += '<line class="axis-line" x1="' + padL + '" x2="' + (W - padR) + '" y1="' + (top2 + h2) + '" y2="' + (top2 + h2) + '"></line>';

    function path(key, Y, isLat) {
      var d = '', prevT = null, pen = false;
      vis.forEach(function (p) {
        var v = p[key];
        if (!isNum(v)) { pen = false; prevT = p.t; return; }
        var broke = prevT !== null && p.t - prevT > interval * 3.5;
        d += (pen && !broke ? 'L' : 'M') + X(p.t).toFixed(1) + ' ' + Y(v).toFixed(1);
        pen = true; prevT = p.t;
      });
      return d;
    }
    if (vis.length) {
      var cd = path('completed', Y1);
      if (cd) {
        // area under completed
        var first = null, last = null;
        vis.forEach(function (p) { if (isNum(p.completed)) { if (first === null) first = p; last = p; } });
        var area = cd.replace(/M/g, 'L').replace(/^L/, 'M') + 'L' + X(last.t).toFixed(1) + ' ' + Y1(0).toFixed(1) + 'L' + X(first.t).toFixed(1) + ' ' + Y1(0).toFixed(1) + 'Z';
        s += '<path d="' + area + '" fill="' + SERIES.completed.color + '" fill-opacity="0.10" stroke="none"></path>';
      }
      s += '<path d="' + path('submitted', Y1) + '" fill="none" stroke="' + SERIES.submitted.color + '" stroke-width="1.2" stroke-dasharray="3 3" stroke-opacity=".8" data-series="submitted"></path>';
      s += '<path d="' + cd + '" fill="none" stroke="' + SERIES.completed.color + '" stroke-width="1.6" data-series="completed"></path>';
      s += '<path d="' + path('failed', Y1) + '" fill="none" stroke="' + SERIES.failed.color + '" stroke-width="1.6" data-series="failed"></path>';
      s += '<path d="' + path('latency_p99_ms', Y2, true) + '" fill="none" stroke="' + SERIES.p99.color + '" stroke-width="1.5" data-series="latency_p99_ms"></path>';
      s += '<path d="' + path('latency_p50_ms', Y2, true) + '" fill="none" stroke="' + SERIES.p50.color + '" stroke-width="1.5" data-series="latency_p50_ms"></path>';
    } else {
      s += '<text class="svg-label" x="' + (padL + plotW / 2) + '" y="' + (top1 + h1 / 2) + '" text-anchor="middle">Waiting for data…</text>';
    }
    s += '<line id="tp-cross" class="axis-line" x1="0" x2="0" y1="' + top1 + '" y2="' + (top2 + h2) + '" style="display:none;stroke:#6e7681"></line>';
    s += '<rect id="tp-hover" x="' + padL + '" y="' + top1 + '" width="' + plotW + '" height="' + (top2 + h2 - top1) + '" fill="transparent"></rect>';
    var svg = '<svg viewBox="0 0 ' + W + ' ' + H + '" height="' + H + '" role="img" aria-label="Throughput and latency" data-points="' + vis.length + '">' + s + '</svg>';
    var tip = box.querySelector('.chart-tip');
    box.innerHTML = svg;
    if (tip) box.appendChild(tip);
    tpGeom = { vis: vis, X: X, tStart: tStart, tEnd: tEnd, padL: padL, plotW: plotW, W: W };
    if (tpHoverX !== null) showTip(tpHoverX);
  }
  function fmtMsShort(ms) {
    if (ms >= 1000) return (ms / 1000).toFixed(ms >= 10000 ? 0 : 1) + 's';
    return (ms >= 10 ? Math.round(ms) : +ms.toFixed(1)) + 'ms';
  }

  function renderThroughputLegend(vis) {
    // latency: the newest second that had completions (idle seconds carry null)
    function lastVal(key) {
      for (var i = vis.length - 1; i >= 0 && i >= vis.length - 30; i--) if (isNum(vis[i][key])) return vis[i][key];
      return null;
    }
    // average over last 10 s for a steadier headline
    var tail = vis.slice(-10);
    function avg(key) {
      var sum = 0, n = 0;
      tail.forEach(function (p) { if (isNum(p[key])) { sum += p[key]; n++; } });
      return n ? sum / n : null;
    }
    var items = [
      ['completed', fmtRate(avg('completed')) + '/s'],
      ['failed', fmtRate(avg('failed')) + '/s'],
      ['submitted', fmtRate(avg('submitted')) + '/s'],
      ['p50', fmtMs(lastVal('latency_p50_ms'))],
      ['p99', fmtMs(lastVal('latency_p99_ms'))]
    ];
    $('throughput-legend').innerHTML = items.map(function (it) {
      var sr = SERIES[it[0]];
      var dash = it[0] === 'submitted' ? 'background:repeating-linear-gradient(90deg,' + sr.color + ' 0 3px,transparent 3px 6px)' : 'background:' + sr.color;
      return '<span class="lg" data-series="' + it[0] + '"><i class="sw" style="' + dash + '"></i>' + esc(sr.label) + ' <b>' + esc(it[1]) + '</b></span>';
    }).join('') + '<span class="lg muted small" style="margin-left:auto">10 s avg</span>';
  }

  var tpHoverX = null;
  function showTip(clientX) {
    var box = $('throughput-chart');
    var svg = box.querySelector('svg');
    if (!svg || !tpGeom || !tpGeom.vis.length) return;
    var rect = svg.getBoundingClientRect();
    var scale = tpGeom.W / rect.width;
    var x = (clientX - rect.left) * scale;
    if (x < tpGeom.padL || x > tpGeom.padL + tpGeom.plotW) { hideTip(); return; }
    var t = tpGeom.tStart + (x - tpGeom.padL) / tpGeom.plotW * (tpGeom.tEnd - tpGeom.tStart);
    var best = null, bd = Infinity;
    tpGeom.vis.forEach(function (p) { var d = Math.abs(p.t - t); if (d < bd) { bd = d; best = p; } });
    if (!best) return;
    var cx = tpGeom.X(best.t);
    var cross = svg.querySelector('#tp-cross');
    cross.setAttribute('x1', cx); cross.setAttribute('x2', cx); cross.style.display = '';
    var tip = box.querySelector('.chart-tip');
    if (!tip) { tip = h('div', { class: 'chart-tip' }); box.appendChild(tip); }
    var d = new Date(best.t * 1000);
    tip.innerHTML = '<div class="t">' + pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds()) + '</div>' +
      row('completed', fmtRate(best.completed) + '/s', SERIES.completed.color) +
      row('failed', fmtRate(best.failed) + '/s', SERIES.failed.color) +
      row('submitted', fmtRate(best.submitted) + '/s', SERIES.submitted.color) +
      row('p50', fmtMs(best.latency_p50_ms), SERIES.p50.color) +
      row('p99', fmtMs(best.latency_p99_ms), SERIES.p99.color);
    var px = cx / scale + 12;
    if (px + 170 > rect.width) px = cx / scale - 170;
    tip.style.left = (px + 12) + 'px';
    tip.style.top = '10px';
    function row(k, v, c) { return '<div class="r"><span style="color:' + c + '">' + k + '</span><b>' + esc(v) + '</b></div>'; }
  }
  function hideTip() {
    var box = $('throughput-chart');
    var tip = box.querySelector('.chart-tip');
    if (tip) tip.parentNode.removeChild(tip);
    var cross = box.querySelector('#tp-cross');
    if (cross) cross.style.display = 'none';
  }

  // ------------------------------------------------------------------ job log
  var log = {
    filter: { state: '', task: '', queue: '' },
    tab: 'all',
    ids: [],                 // displayed job ids, newest first
    jobs: new Map(),         // id -> job (displayed)
    rows: new Map(),         // id -> <tr>
    spill: [],               // trimmed-from-bottom jobs, oldest first (pop() gives the newest)
    spillMap: new Map(),
    cursor: null,            // server cursor for jobs after (older than) spill
    cursorLost: false,       // spill overflowed: older jobs need a fresh reload
    hasMore: false,
    live: true,              // false when browsing older pages (top was trimmed)
    newWhileAway: new Set(),
    loading: false,
    gen: 0,
    buffered: null,          // events buffered while the first page loads
    selected: null
  };

  function jobQuery(cursor) {
    var q = ['limit=' + PAGE_SIZE];
    var f = currentFilter();
    if (f.state) q.push('state=' + encodeURIComponent(f.state));
    if (f.task) q.push('task=' + encodeURIComponent(f.task));
    if (f.queue) q.push('queue=' + encodeURIComponent(f.queue));
    if (cursor) q.push('cursor=' + encodeURIComponent(cursor));
    return '/api/jobs?' + q.join('&');
  }
  function currentFilter() {
    return { state: log.tab === 'dead' ? 'dead' : log.filter.state, task: log.filter.task, queue: log.filter.queue };
  }
  function matchesFilter(job) {
    var f = currentFilter();
    if (f.state && job.state !== f.state) return false;
    if (f.task && job.task !== f.task) return false;
    if (f.queue && job.queue !== f.queue) return false;
    return true;
  }
  // a is newer than b. The server lists newest first by `seq` (assigned at acceptance);
  // created_at (then id) is the fallback when an object carries no seq.
  function newer(a, b) {
    if (isNum(a.seq) && isNum(b.seq)) return a.seq > b.seq;
    var ta = isNum(a.created_at) ? a.created_at : 0, tb = isNum(b.created_at) ? b.created_at : 0;
    if (ta !== tb) return ta > tb;
    return String(a.id) > String(b.id);
  }

  function resetJobs() {
    log.gen++;
    var gen = log.gen;
    log.ids = []; log.jobs.clear(); log.rows.clear();
    log.spill = []; log.spillMap.clear();
    log.cursor = null; log.cursorLost = false; log.hasMore = false;
    log.live = true; log.newWhileAway.clear();
    log.buffered = [];
    $('job-log-body').replaceChildren();
    $('new-jobs-banner').hidden = true;
    log.loading = true;
    updateLoadMore();
    return apiGet(jobQuery(null)).then(function (data) {
      if (gen !== log.gen) return;
      clearPanelError('jobs-panel');
      var jobs = (data && data.jobs) || [];
      appendJobs(jobs);
      log.cursor = data && data.next_cursor ? data.next_cursor : null;
      log.hasMore = !!log.cursor;
    }, function (e) {
      if (gen !== log.gen) return;
      panelError('jobs-panel', e);
    }).then(function () {
      if (gen !== log.gen) return;
      log.loading = false;
      var buf = log.buffered || [];
      log.buffered = null;
      buf.forEach(applyJobEvent);
      updateLoadMore();
      updateEmpty();
    });
  }

  // After a stream reconnect: merge the newest page into the current list.
  function resyncJobs() {
    if (!log.live || log.loading) return;
    var gen = log.gen;
    apiGet(jobQuery(null)).then(function (data) {
      if (gen !== log.gen) return;
      ((data && data.jobs) || []).forEach(function (j) { upsertJob(j, true); });
      updateEmpty();
    }, function () {});
  }

  function appendJobs(jobs) {
    var body = $('job-log-body');
    var frag = document.createDocumentFragment();
    jobs.forEach(function (job) {
      if (!job || job.id == null) return;
      var id = String(job.id);
      if (log.jobs.has(id)) { updateRow(id, job); return; }
      log.jobs.set(id, job);
      log.ids.push(id);
      var tr = makeRow(job);
      log.rows.set(id, tr);
      frag.appendChild(tr);
    });
    body.appendChild(frag);
  }

  function makeRow(job) {
    var tr = document.createElement('tr');
    tr.setAttribute('data-job-id', String(job.id));
    tr.tabIndex = 0;
    fillJobRow(tr, job);
    if (log.selected === String(job.id)) tr.classList.add('selected');
    return tr;
  }

  function statusPill(job) {
    var st = STATES.indexOf(job.state) >= 0 ? job.state : 'cancelled';
    var pill = h('span', { class: 'pill pill-' + st }, h('i', { class: 'sdot st-' + st }), String(job.state || '?'));
    var pct = job.state === 'running' ? progressPct(job.progress) : null;
    if (pct !== null) pill.appendChild(h('span', { class: 'pct', text: Math.round(pct) + '%' }));
    return pill;
  }

  function resultCell(job) {
    var td = h('td', { class: 'c-result result' });
    var txt = '';
    if (job.state === 'dead' || (job.error && job.state !== 'completed')) {
      var e = job.error;
      if (e) {
        txt = (e.type ? e.type + ': ' : '') + (e.message || '');
        td.classList.add('err');
      }
    } else if (job.state === 'completed') {
      txt = job.result === undefined ? '' : compactJson(job.result, 100);
    } else if (job.state === 'running' && job.progress && job.progress.message) {
      txt = String(job.progress.message);
    } else if (job.state === 'scheduled' && isNum(job.run_at)) {
      txt = 'runs ' + fmtAgoOrIn(job.run_at);
    }
    td.textContent = txt || '—';
    if (txt) td.title = txt.length > 400 ? txt.slice(0, 400) + '…' : txt;
    else td.classList.add('muted');
    return td;
  }

  // Cells are keyed: an update rebuilds only the cells whose content changed, so a burst
  // of state changes dirties few nodes (cheap style/layout on a 300-row table).
  function jobCells(job) {
    var id = String(job.id);
    var p = isNum(job.priority) ? job.priority : null;
    var pct = job.state === 'running' ? progressPct(job.progress) : null;
    var dur = '';
    if (isNum(job.started_at)) dur = fmtDuration((isNum(job.finished_at) ? job.finished_at : (job.state === 'running' ? nowS() : job.started_at)) - job.started_at);
    var resKey = job.state + '|' + (job.error ? (job.error.type || '') + ':' + (job.error.message || '') : '') + '|' +
      (job.state === 'completed' ? compactJson(job.result, 100) : job.state === 'running' && job.progress ? String(job.progress.message || '') : job.state === 'scheduled' ? String(job.run_at) : '');
    var showActions = job.state === 'dead' && log.tab === 'dead';
    return [
      [id, function () { return h('td', { class: 'c-id' }, h('code', { title: id, text: shortId(id) })); }],
      [String(job.task), function () { return h('td', { class: 'c-task', title: String(job.task || '') }, String(job.task || '—')); }],
      [String(job.queue), function () { return h('td', { class: 'c-queue muted', title: String(job.queue || '') }, String(job.queue || '—')); }],
      [String(p), function () { return h('td', { class: 'c-pri num' }, h('span', { class: 'prio prio-' + p, text: p === null ? '—' : 'P' + p })); }],
      [job.state + '|' + (pct === null ? '' : Math.round(pct)) + '|' + job.attempts + '|' + job.max_attempts + '|' + job.failures, function () {
        var att = isNum(job.attempts) ? 'attempt ' + job.attempts + (isNum(job.max_attempts) ? ' of ' + job.max_attempts : '') + (isNum(job.failures) && job.failures ? ', ' + job.failures + ' failure' + (job.failures === 1 ? '' : 's') : '') : '';
        var td = h('td', { class: 'c-status', title: att }, statusPill(job));
        if (isNum(job.attempts) && job.attempts > 1) td.appendChild(h('span', { class: 'att', text: '×' + job.attempts }));
        return td;
      }],
      [String(job.worker) + '|' + (job.worker ? workerLabel(job.worker) : ''), function () {
        return h('td', { class: 'c-worker muted', title: job.worker ? String(job.worker) : '' }, job.worker ? workerLabel(job.worker) : '—');
      }],
      [resKey, function () { return resultCell(job); }],
      [String(job.created_at), function () { return h('td', { class: 'c-time muted', title: fmtStamp(job.created_at) }, fmtClock(job.created_at)); }],
      [dur, function () { return h('td', { class: 'c-dur num muted' }, dur || '—'); }],
      [showActions ? 'a' : '', function () {
        var td = h('td', { class: 'c-act actions' });
        if (showActions) {
          td.appendChild(h('button', { type: 'button', class: 'btn btn-xs', 'data-action': 'retry', 'data-testid': 'row-retry' }, 'Retry'));
          td.appendChild(h('button', { type: 'button', class: 'btn btn-xs btn-danger', 'data-action': 'discard', 'data-testid': 'row-discard' }, 'Discard'));
        }
        return td;
      }]
    ];
  }

  function fillJobRow(tr, job) {
    var st = String(job.state || '');
    if (tr.getAttribute('data-state') !== st) tr.setAttribute('data-state', st);
    var cells = jobCells(job);
    var existing = tr.cells;
    if (existing.length !== cells.length) {
      tr.replaceChildren.apply(tr, cells.map(function (c) { var td = c[1](); td._k = c[0]; return td; }));
      return;
    }
    for (var i = 0; i < cells.length; i++) {
      if (existing[i]._k === cells[i][0]) continue;
      var td = cells[i][1]();
      td._k = cells[i][0];
      tr.replaceChild(td, existing[i]);
    }
  }

  function updateRow(id, job) {
    var tr = log.rows.get(id);
    if (!tr) return;
    var prevState = tr.getAttribute('data-state');
    fillJobRow(tr, job);
    if (prevState !== job.state) pulse(tr, 'rgba(76,154,255,0.16)');
  }

  // Brief highlight of a changed/new row. Web Animations: no forced reflow, and a
  // per-batch budget so a burst of events does not animate hundreds of rows.
  var animBudget = 40;
  function pulse(tr, color) {
    if (animBudget <= 0 || typeof tr.animate !== 'function') return;
    animBudget--;
    tr.animate([{ backgroundColor: color }, { backgroundColor: 'rgba(0,0,0,0)' }], { duration: 900, easing: 'ease-out' });
  }

  function mergeJob(prev, ev) {
    if (!prev) return Object.assign({}, ev);
    var next = Object.assign({}, prev, ev);
    if (ev.error && prev.error && !('traceback' in ev.error) && prev.error.traceback &&
        ev.error.type === prev.error.type && ev.error.message === prev.error.message) {
      next.error = Object.assign({}, ev.error, { traceback: prev.error.traceback });
    }
    return next;
  }

  // Apply a job object (from an event or a mutation response).
  function upsertJob(ev, fromSync) {
    if (!ev || ev.id == null) return;
    var id = String(ev.id);
    if (log.jobs.has(id)) {
      var job = mergeJob(log.jobs.get(id), ev);
      log.jobs.set(id, job);
      if (!matchesFilter(job)) removeRowSoon(id);
      else updateRow(id, job);
    } else if (log.spillMap.has(id)) {
      var sj = mergeJob(log.spillMap.get(id), ev);
      updateSpill(id, sj);
    } else if (matchesFilter(ev)) {
      insertJob(Object.assign({}, ev), fromSync);
    }
    if (detail.id === id) detailOnEvent(ev);
  }

  function updateSpill(id, job) {
    for (var i = log.spill.length - 1; i >= 0; i--) {
      if (String(log.spill[i].id) === id) {
        if (matchesFilter(job)) { log.spill[i] = job; log.spillMap.set(id, job); }
        else { log.spill.splice(i, 1); log.spillMap.delete(id); }
        return;
      }
    }
  }

  function insertJob(job, quiet) {
    var id = String(job.id);
    var ids = log.ids;
    // find position (new jobs almost always go to the top)
    var pos = 0;
    while (pos < ids.length && !newer(job, log.jobs.get(ids[pos]))) pos++;
    if (pos === ids.length && (log.hasMore || log.spill.length || log.cursorLost) && ids.length) return; // belongs to an unloaded page
    if (!log.live && pos === 0) {
      // browsing older pages: don't disturb, just count
      log.newWhileAway.add(id);
      updateBanner();
      return;
    }
    log.jobs.set(id, job);
    ids.splice(pos, 0, id);
    var tr = makeRow(job);
    log.rows.set(id, tr);
    var body = $('job-log-body');
    var before = pos + 1 < ids.length ? log.rows.get(ids[pos + 1]) : null;
    body.insertBefore(tr, before);
    if (!quiet) pulse(tr, 'rgba(63,185,80,0.13)');
    if (ids.length > MAX_ROWS) trimBottom();
    updateEmpty();
  }

  function trimBottom() {
    while (log.ids.length > MAX_ROWS) {
      var id = log.ids.pop();
      var job = log.jobs.get(id);
      var tr = log.rows.get(id);
      if (tr && tr.parentNode) tr.parentNode.removeChild(tr);
      log.rows.delete(id); log.jobs.delete(id);
      if (log.selected === id) { /* keep detail open; row is just out of view */ }
      log.spill.push(job); log.spillMap.set(id, job);
    }
    if (log.spill.length > SPILL_MAX * 1.25) {
      var drop = log.spill.splice(0, log.spill.length - SPILL_MAX);
      drop.forEach(function (j) { log.spillMap.delete(String(j.id)); });
      log.cursor = null; log.cursorLost = true;
    }
    updateLoadMore();
  }

  function trimTop() {
    var removed = 0;
    while (log.ids.length > MAX_ROWS) {
      var id = log.ids.shift();
      var tr = log.rows.get(id);
      if (tr && tr.parentNode) tr.parentNode.removeChild(tr);
      log.rows.delete(id); log.jobs.delete(id);
      removed++;
    }
    if (removed) { log.live = false; updateBanner(); }
  }

  // A row whose job no longer matches the active filter leaves the list at once
  // (so a filtered view only ever shows matching rows).
  function removeRowSoon(id) { removeRow(id); }
  function removeRow(id) {
    var tr = log.rows.get(id);
    if (tr && tr.parentNode) tr.parentNode.removeChild(tr);
    log.rows.delete(id); log.jobs.delete(id);
    var i = log.ids.indexOf(id);
    if (i >= 0) log.ids.splice(i, 1);
    updateEmpty(); updateJobCount();
  }

  function loadMore() {
    if (log.loading) return;
    var btn = $('load-more');
    if (log.spill.length) {
      var batch = [];
      while (batch.length < PAGE_SIZE && log.spill.length) {
        var j = log.spill.pop();
        log.spillMap.delete(String(j.id));
        batch.push(j);
      }
      appendJobs(batch);
      trimTop();
      updateLoadMore(); updateEmpty();
      return;
    }
    if (log.cursorLost) { resetJobs(); return; }
    if (!log.cursor) return;
    var gen = log.gen;
    log.loading = true;
    updateLoadMore();
    withBusy(btn, apiGet(jobQuery(log.cursor))).then(function (data) {
      if (gen !== log.gen) return;
      appendJobs((data && data.jobs) || []);
      log.cursor = data && data.next_cursor ? data.next_cursor : null;
      log.hasMore = !!log.cursor;
      trimTop();
    }, function (e) {
      if (gen === log.gen) toast('Loading more jobs failed: ' + e.message, 'err', e.code);
    }).then(function () {
      if (gen !== log.gen) return;
      log.loading = false;
      updateLoadMore(); updateEmpty();
    });
  }

  function updateLoadMore() {
    var btn = $('load-more');
    var more = log.spill.length > 0 || !!log.cursor || log.cursorLost;
    btn.disabled = log.loading || !more;
    btn.textContent = log.loading ? 'Loading…' : more ? (log.cursorLost && !log.spill.length ? 'Reload older jobs' : 'Load more') : 'No more jobs';
    btn.setAttribute('data-has-more', more ? 'true' : 'false');
    updateJobCount();
  }

  function updateJobCount() {
    var n = log.ids.length;
    var f = currentFilter();
    var total = null, s = state.stats;
    if (s && s.jobs) {
      if (!f.task && !f.queue) total = f.state ? s.jobs[f.state] : s.total;
    }
    if (isNum(total) && total < n) total = null;
    var txt = n ? 'Showing ' + n + (isNum(total) ? ' of ' + total : '') + ' job' + (n === 1 && !isNum(total) ? '' : 's') : '';
    if (!log.live) txt += ' · older page';
    var el = $('job-count');
    if (el.textContent !== txt) el.textContent = txt;
    el.setAttribute('data-rows', String(n));
  }

  function updateEmpty() {
    $('jobs-empty').hidden = log.ids.length > 0 || log.loading;
    updateJobCount();
  }

  function updateBanner() {
    var b = $('new-jobs-banner');
    if (log.live) { b.hidden = true; return; }
    b.hidden = false;
    var n = log.newWhileAway.size;
    $('new-jobs-text').textContent = 'Showing older jobs; live updates apply to visible rows.' + (n ? ' ' + n + ' new job' + (n === 1 ? '' : 's') + ' since.' : '');
  }

  // --- batching of job events (coalesced by id, flushed ~12x per second)
  var jobEventQueue = new Map();
  var jobFlushTimer = null;
  function queueJobEvent(ev) {
    if (!ev || ev.id == null) return;
    var id = String(ev.id);
    var prev = jobEventQueue.get(id);
    jobEventQueue.set(id, prev ? mergeJob(prev, ev) : ev);
    if (!jobFlushTimer) jobFlushTimer = setTimeout(flushJobEvents, flushDelay);
  }
  // Busy brokers: flush less often (bigger, coalesced batches) to keep the page light.
  var flushDelay = 80;
  function flushJobEvents() {
    jobFlushTimer = null;
    animBudget = 40;
    var batch = Array.from(jobEventQueue.values());
    jobEventQueue.clear();
    flushDelay = batch.length > 250 ? 1000 : batch.length > 100 ? 600 : batch.length > 25 ? 300 : 80;
    if (batch.length > 25) animBudget = 0;
    // insert oldest first so the newest ends on top
    batch.sort(function (a, b) { return newer(a, b) ? 1 : newer(b, a) ? -1 : 0; });
    batch.forEach(applyJobEvent);
    updateJobCount();
  }
  function applyJobEvent(ev) {
    if (log.buffered) { log.buffered.push(ev); if (detail.id === String(ev.id)) detailOnEvent(ev); return; }
    upsertJob(ev, false);
  }

  function onJobLogClick(e) {
    var btn = e.target.closest('button[data-action]');
    var tr = e.target.closest('tr[data-job-id]');
    if (!tr) return;
    var id = tr.getAttribute('data-job-id');
    if (btn) {
      e.stopPropagation();
      jobAction(id, btn.getAttribute('data-action'), btn);
      return;
    }
    openDetail(id);
  }

  // An answer to a request (submit, cancel, retry) shows the job as it was when the broker
  // answered; the event stream, in commit order, may already have shown a later state (a quick
  // job completed before the answer arrived). An answer is applied only if no event about that
  // job came after the request was sent: the stream always brings the request's own change.
  var lastEventAt = new Map();
  function noteJobEvent(id) {
    if (lastEventAt.size > 20000) lastEventAt.clear();
    lastEventAt.set(String(id), performance.now());
  }
  function answerIsNewest(id, sentAt) {
    var seen = lastEventAt.get(String(id));
    return seen === undefined || seen < sentAt;
  }

  function jobAction(id, action, btn) {
    var labels = { cancel: 'Cancel', retry: 'Retry', discard: 'Discard' };
    var done = { cancel: 'Cancelled', retry: 'Retried', discard: 'Discarded' };
    var sentAt = performance.now();
    return withBusy(btn, mutate('POST', '/api/jobs/' + encodeURIComponent(id) + '/' + action, undefined,
      { label: labels[action] + ' ' + shortId(id), success: done[action] + ' job ' + shortId(id) }))
      .then(function (job) {
        if (job && job.id != null && answerIsNewest(job.id, sentAt)) upsertJob(job, false);
        if (action === 'discard') {
          // a discarded dead job leaves the dead list even if the server echoes its last state
          if (log.tab === 'dead' || (job && job.state === 'dead')) removeRowSoon(String(id));
          if (detail.id === String(id)) refreshDetail();
        }
        refreshQueuesSoon(); refreshTasksSoon();
        return job;
      });
  }

  // ------------------------------------------------------------------ job detail
  var detail = { id: null, job: null, gen: 0, missing: false };

  function openDetail(id) {
    id = String(id);
    detail.id = id; detail.job = log.jobs.get(id) || log.spillMap.get(id) || null; detail.missing = false;
    detail.gen++;
    if (log.selected && log.rows.get(log.selected)) log.rows.get(log.selected).classList.remove('selected');
    log.selected = id;
    if (log.rows.get(id)) log.rows.get(id).classList.add('selected');
    var panel = $('job-detail');
    panel.hidden = false;
    panel.setAttribute('data-job-id', id);
    $('drawer-backdrop').hidden = false;
    detail.returnFocus = document.activeElement;
    setTimeout(function () { if (detail.id === id) $('detail-close').focus({ preventScroll: true }); }, 0);
    renderDetail();
    refreshDetail();
  }

  function closeDetail() {
    $('job-detail').hidden = true;
    $('drawer-backdrop').hidden = true;
    $('job-detail').removeAttribute('data-job-id');
    if (log.selected && log.rows.get(log.selected)) log.rows.get(log.selected).classList.remove('selected');
    log.selected = null;
    detail.id = null; detail.job = null; detail.gen++;
    var rf = detail.returnFocus; detail.returnFocus = null;
    if (rf && rf.isConnected && typeof rf.focus === 'function') rf.focus({ preventScroll: true });
  }

  function refreshDetail() {
    var id = detail.id, gen = detail.gen;
    if (!id) return Promise.resolve();
    $('detail-note').textContent = 'Loading…';
    return apiGet('/api/jobs/' + encodeURIComponent(id)).then(function (job) {
      if (gen !== detail.gen) return;
      detail.job = mergeJob(detail.job, job);
      detail.missing = false;
      $('detail-note').textContent = '';
      renderDetail();
    }, function (e) {
      if (gen !== detail.gen) return;
      if (e.status === 404) { detail.missing = true; $('detail-note').textContent = 'Job not found (discarded?)'; renderDetail(); }
      else $('detail-note').textContent = 'Error: ' + e.message;
    });
  }

  var detailRefetch = null;
  function detailOnEvent(ev) {
    var prevState = detail.job && detail.job.state;
    detail.job = mergeJob(detail.job, ev);
    renderDetail();
    // events may omit payload/traceback: fetch the full job once it reaches an end state
    if (prevState !== ev.state && (ev.state === 'dead' || ev.state === 'completed' || (ev.error && !('traceback' in ev.error)))) {
      clearTimeout(detailRefetch);
      detailRefetch = setTimeout(refreshDetail, 250);
    }
  }

  function renderDetail() {
    var job = detail.job;
    var id = detail.id;
    $('detail-id').textContent = id || '';
    var body = $('detail-body');
    var canCancel = !!job && !detail.missing && (job.state === 'queued' || job.state === 'scheduled' || job.state === 'running');
    var canRetry = !!job && !detail.missing && (job.state === 'dead' || job.state === 'cancelled' || job.state === 'completed');
    var canDiscard = !!job && !detail.missing && (job.state === 'dead' || job.state === 'cancelled');
    $('cancel-button').disabled = !canCancel;
    $('retry-button').disabled = !canRetry;
    $('discard-button').disabled = !canDiscard;
    if (!job) { body.replaceChildren(h('div', { class: 'empty', text: detail.missing ? 'Job not found.' : 'Loading…' })); return; }
    $('job-detail').setAttribute('data-state', String(job.state || ''));
    var kv = h('dl', { class: 'kv', 'data-testid': 'detail-fields' });
    function add(label, value, field) {
      kv.appendChild(h('dt', null, label));
      var dd = h('dd', { 'data-field': field || label.toLowerCase() });
      if (value instanceof Node) dd.appendChild(value); else dd.textContent = value === null || value === undefined || value === '' ? '—' : String(value);
      kv.appendChild(dd);
    }
    add('State', statusPill(job), 'state');
    add('Task', job.task, 'task');
    add('Queue', job.queue, 'queue');
    add('Priority', isNum(job.priority) ? 'P' + job.priority : '—', 'priority');
    add('Attempts', (isNum(job.attempts) ? job.attempts : '—') + (isNum(job.max_attempts) ? ' of ' + job.max_attempts : '') + (isNum(job.failures) && job.failures ? ' · ' + job.failures + ' failure' + (job.failures === 1 ? '' : 's') : ''), 'attempts');
    add('Worker', job.worker ? workerLabel(job.worker) + (workerLabel(job.worker) !== String(job.worker) ? ' (' + job.worker + ')' : '') : '—', 'worker');
    add('Created', fmtFull(job.created_at), 'created_at');
    if (isNum(job.run_at)) add('Run at', fmtFull(job.run_at), 'run_at');
    add('Started', isNum(job.started_at) ? fmtFull(job.started_at) : '—', 'started_at');
    add('Finished', isNum(job.finished_at) ? fmtFull(job.finished_at) : '—', 'finished_at');
    if (isNum(job.started_at)) add('Duration', fmtDuration((isNum(job.finished_at) ? job.finished_at : nowS()) - job.started_at), 'duration');
    if (job.dead_reason) add('Dead reason', String(job.dead_reason), 'dead_reason');
    if (isNum(job.worker_losses) && job.worker_losses) add('Worker losses', String(job.worker_losses), 'worker_losses');
    if (job.idempotency_key) add('Idempotency', String(job.idempotency_key), 'idempotency_key');
    add('Timeout', isNum(job.timeout) ? fmtDuration(job.timeout) : (job.timeout == null ? 'none' : String(job.timeout)), 'timeout');
    var parts = [kv];
    if (job.progress) {
      var pct = progressPct(job.progress);
      parts.push(h('h4', null, 'Progress'));
      var pbox = h('div', { 'data-testid': 'detail-progress' });
      if (pct !== null) pbox.appendChild(h('div', { class: 'progress' }, h('i', { style: 'width:' + pct.toFixed(1) + '%' })));
      pbox.appendChild(h('div', { class: 'small muted', style: 'margin-top:4px' }, (pct !== null ? Math.round(pct) + '%' : '') + (job.progress.message ? (pct !== null ? ' · ' : '') + job.progress.message : '')));
      parts.push(pbox);
    }
    if (job.error) {
      parts.push(h('h4', null, 'Error'));
      parts.push(h('div', { class: 'error-box', 'data-testid': 'detail-error' },
        h('div', { class: 'etype', text: String(job.error.type || 'Error') }),
        h('div', { class: 'emsg', text: String(job.error.message || '') })));
      if (job.error.traceback) parts.push(h('pre', { class: 'tb', 'data-testid': 'detail-traceback', text: String(job.error.traceback) }));
    }
    if (job.state === 'completed' || job.result !== undefined && job.result !== null) {
      parts.push(h('h4', null, 'Result'));
      parts.push(h('pre', { 'data-testid': 'detail-result', text: job.result === undefined ? '(not loaded)' : prettyJson(job.result) }));
    }
    parts.push(h('h4', null, 'Payload'));
    parts.push(h('pre', { 'data-testid': 'detail-payload', text: job.payload === undefined ? '(not loaded)' : prettyJson(job.payload) }));
    var scroll = body.scrollTop;
    body.replaceChildren.apply(body, parts);
    body.scrollTop = scroll;
  }

  function detailAction(action, btn) {
    if (!detail.id) return;
    var id = detail.id;
    jobAction(id, action, btn).then(function (job) {
      if (job && job.id != null && detail.id === id) { detail.job = mergeJob(detail.job, job); renderDetail(); }
    }, function () {});
  }

  // ------------------------------------------------------------------ submit form
  function validatePayload() {
    var ta = $('submit-payload');
    var txt = ta.value.trim();
    var msg = '';
    var value = null;
    if (txt === '') value = null;
    else {
      try { value = JSON.parse(txt); }
      catch (e) { msg = 'Invalid JSON: ' + String(e.message || e).replace(/^JSON\.parse: /, ''); }
    }
    $('payload-error').textContent = msg;
    ta.classList.toggle('invalid', !!msg);
    ta.setAttribute('aria-invalid', msg ? 'true' : 'false');
    return { ok: !msg, value: value, message: msg };
  }

  function setSubmitResult(kind, content) {
    var box = $('submit-result');
    box.className = 'submit-result ' + (kind || '');
    box.setAttribute('data-state', kind || '');
    // the job id belongs to the one outcome that sets it again right after: never to a
    // later "Submitting…" or error
    box.removeAttribute('data-job-id');
    box.replaceChildren();
    if (content instanceof Node) box.appendChild(content); else box.textContent = content || '';
  }

  function numField(id, opts) {
    var el = $(id);
    var raw = el.value.trim();
    el.classList.remove('invalid');
    if (raw === '') return { value: undefined };
    var n = Number(raw);
    var bad = !isFinite(n) || (opts.int && Math.floor(n) !== n) || (opts.min !== undefined && n < opts.min) || (opts.max !== undefined && n > opts.max);
    if (bad) { el.classList.add('invalid'); return { error: opts.label + ' must be ' + opts.rule + '.' }; }
    return { value: n };
  }

  function onSubmit(e) {
    e.preventDefault();
    var task = $('submit-task').value.trim();
    var errors = [];
    $('submit-task').classList.toggle('invalid', !task);
    if (!task) errors.push('Task is required.');
    var pl = validatePayload();
    if (!pl.ok) errors.push('Payload: ' + pl.message);
    var pr = numField('submit-priority', { int: true, min: 1, max: 10, label: 'Priority', rule: 'an integer from 1 to 10' });
    var dl = numField('submit-delay', { min: 0, label: 'Delay', rule: 'a number of seconds ≥ 0' });
    var ma = numField('submit-max-attempts', { int: true, min: 1, label: 'Max attempts', rule: 'an integer ≥ 1' });
    var to = numField('submit-timeout', { min: 0, label: 'Timeout', rule: 'a number of seconds ≥ 0' });
    [pr, dl, ma, to].forEach(function (r) { if (r.error) errors.push(r.error); });
    if (errors.length) { setSubmitResult('err', errors.join(' ')); return; }
    var body = {
      task: task,
      priority: pr.value === undefined ? 5 : pr.value,
      queue: $('submit-queue').value.trim() || 'default'
    };
    if ($('submit-payload').value.trim() !== '') body.payload = pl.value;
    if (dl.value !== undefined) body.delay = dl.value;
    if (ma.value !== undefined) body.max_attempts = ma.value;
    if (to.value !== undefined) body.timeout = to.value;
    var ik = $('submit-idempotency-key').value.trim();
    if (ik) body.idempotency_key = ik;
    setSubmitResult('', 'Submitting…');
    var sentAt = performance.now();
    withBusy($('submit-button'), mutate('POST', '/api/submit', body, { quiet: true })).then(function (data) {
      var id = data && (data.id != null ? data.id : data.job && data.job.id);
      var link = h('a', { 'data-testid': 'submit-job-id', 'data-job-id': String(id), title: 'Open job ' + id, text: String(id) });
      link.addEventListener('click', function () { openDetail(id); });
      setSubmitResult('ok', h('span', null, data && data.existing ? '✓ Already submitted (idempotency key): job ' : '✓ Submitted job ', link));
      $('submit-result').setAttribute('data-job-id', String(id));
      if (data && data.job && data.job.id != null && answerIsNewest(data.job.id, sentAt)) queueJobEvent(data.job);
      refreshTasksSoon(); refreshQueuesSoon();
    }, function (err) {
      var msg = err.code === 'no_token' ? 'Not submitted: a token is required.' : 'Error' + (err.code && err.code.indexOf('http_') !== 0 ? ' (' + err.code + ')' : '') + ': ' + err.message;
      setSubmitResult('err', msg);
      $('submit-result').removeAttribute('data-job-id');
    });
  }

  // ------------------------------------------------------------------ SSE
  var stream = { es: null, everOpen: false, hadError: false, lastMsg: 0, retryMs: 1000, retryTimer: null };

  function setConn(st, label) {
    var el = $('conn-status');
    el.setAttribute('data-state', st);
    el.querySelector('.conn-label').textContent = label;
  }

  var readyWaiters = [];
  function whenStreamReady(fn) {
    if (stream.everOpen) { fn(); return; }
    readyWaiters.push(fn);
    // don't keep the page empty if the stream cannot be opened
    setTimeout(flushReady, 2500);
  }
  function flushReady() {
    var w = readyWaiters; readyWaiters = [];
    w.forEach(function (fn) { fn(); });
  }

  function connect() {
    clearTimeout(stream.retryTimer);
    if (stream.es) { try { stream.es.close(); } catch (e) { /* ignore */ } }
    if (typeof EventSource === 'undefined') { setConn('offline', 'No SSE support'); return; }
    setConn(stream.everOpen ? 'reconnecting' : 'connecting', stream.everOpen ? 'Reconnecting…' : 'Connecting…');
    var es = new EventSource('/api/events');
    stream.es = es;
    stream.lastMsg = Date.now();
    es.onopen = function () {
      if (stream.es !== es) return;
      var wasDown = stream.everOpen && stream.hadError;
      stream.everOpen = true; stream.hadError = false; stream.retryMs = 1000;
      stream.lastMsg = Date.now();
      setConn('live', 'Live');
      flushReady();
      if (wasDown) resyncAll();
    };
    es.onerror = function () {
      if (stream.es !== es) return;
      stream.hadError = true;
      if (es.readyState === 2 /* CLOSED */) {
        setConn('reconnecting', 'Reconnecting in ' + Math.round(stream.retryMs / 1000) + 's…');
        stream.retryTimer = setTimeout(connect, stream.retryMs);
        stream.retryMs = Math.min(30000, stream.retryMs * 2);
      } else {
        setConn('reconnecting', 'Reconnecting…');
      }
    };
    function guard(fn) {
      return function (e) {
        if (stream.es !== es) return;
        stream.lastMsg = Date.now();
        if ($('conn-status').getAttribute('data-state') !== 'live') setConn('live', 'Live');
        var data;
        try { data = JSON.parse(e.data); } catch (err) { return; }
        fn(data);
      };
    }
    es.addEventListener('job', guard(onJobEvent));
    es.addEventListener('worker', guard(onWorkerEvent));
    es.addEventListener('stats', guard(onStatsEvent));
    es.onmessage = guard(function () {});
  }

  function onJobEvent(job) {
    if (job && job.id != null) noteJobEvent(job.id);
    queueJobEvent(job);
    refreshQueuesSoon();
    refreshTasksSoon();
    // a job started or ended on a worker: its current jobs and counts changed
    if (job && (job.worker || job.state === 'running')) refreshWorkersSoon();
  }

  function workersSig(s) {
    var w = (s && s.workers) || {};
    return [w.total, w.idle, w.busy, w.free, w.capacity].join(',');
  }
  function onStatsEvent(s) {
    if (s && s.point) addPoint(s.point);
    var prevSig = state.stats ? workersSig(state.stats) : null;
    applyStats(s);
    if (prevSig !== null && prevSig !== workersSig(s)) refreshWorkersSoon();
    else if (state.workers.size && Date.now() - lastFetch.workers > WORKERS_REFRESH_MS && !document.hidden) refreshWorkersSoon();
  }

  function resyncAll() {
    loadStats(); loadWorkers(); loadQueues(); loadTasks(); loadTimeseries(); loadSecurity();
    resyncJobs();
  }

  // ------------------------------------------------------------------ timers
  function tick() {
    var now = nowS();
    document.querySelectorAll('#workers-body .rel-time').forEach(function (el) {
      var ts = parseFloat(el.getAttribute('data-ts'));
      var txt = isNaN(ts) ? '–' : fmtAgo(ts);
      if (el.textContent !== txt) el.textContent = txt;
      var stale = !isNaN(ts) && now - ts > 30;
      el.style.color = stale ? 'var(--amber)' : '';
    });
    var since = Math.max(0, now - state.queuesFetchedAt);
    document.querySelectorAll('#queues-body .queue-age').forEach(function (el) {
      var a = parseFloat(el.getAttribute('data-age'));
      if (isNaN(a)) return;
      var depth = parseInt(el.getAttribute('data-depth'), 10) || 0;
      var txt = fmtAge(a + (depth > 0 ? since : 0));
      if (el.textContent !== txt) el.textContent = txt;
    });
    // watchdog: a silent stream is reconnected
    if (stream.es && stream.everOpen && Date.now() - stream.lastMsg > STALE_STREAM_MS) {
      stream.hadError = true;
      connect();
    }
  }

  // Gentle safety net: only what the event stream did not already refresh recently.
  function safetyRefresh() {
    if (document.hidden) return;
    var now = Date.now(), stale = SAFETY_REFRESH_MS - 1000;
    loadWorkers();
    if (now - lastFetch.stats > 5000) loadStats();
    if (now - lastFetch.queues > stale) loadQueues();
    if (now - lastFetch.tasks > stale) loadTasks();
    var live = $('conn-status').getAttribute('data-state') === 'live';
    if (!live) loadTimeseries();
  }

  // ------------------------------------------------------------------ wiring
  function setTab(tab) {
    if (log.tab === tab) return;
    log.tab = tab;
    $('tab-all').classList.toggle('active', tab === 'all');
    $('tab-dead').classList.toggle('active', tab === 'dead');
    $('tab-all').setAttribute('aria-selected', tab === 'all' ? 'true' : 'false');
    $('tab-dead').setAttribute('aria-selected', tab === 'dead' ? 'true' : 'false');
    var sel = $('filter-state');
    sel.disabled = tab === 'dead';
    sel.value = tab === 'dead' ? 'dead' : log.filter.state;
    $('jobs-panel').setAttribute('data-view', tab);
    resetJobs();
  }

  function init() {
    updateTokenButton();
    $('jobs-panel').setAttribute('data-view', 'all');

    // The stream is opened first and the job list / workers snapshots are taken once it is
    // open, so no change falls between a snapshot and the subscription (events that arrive
    // while a snapshot loads are buffered and replayed on top of it).
    connect();
    loadStats(); loadSecurity(); loadQueues(); loadTasks(); loadTimeseries();
    whenStreamReady(function () { loadWorkers(); resetJobs(); });

    // job log
    $('job-log-body').addEventListener('click', onJobLogClick);
    $('job-log-body').addEventListener('keydown', function (e) {
      if (e.key !== 'Enter' || e.target.tagName !== 'TR') return;
      e.preventDefault();
      openDetail(e.target.getAttribute('data-job-id'));
    });
    $('load-more').addEventListener('click', loadMore);
    $('back-to-newest').addEventListener('click', function () { resetJobs(); $('job-log-wrap').scrollTop = 0; });
    $('tab-all').addEventListener('click', function () { setTab('all'); });
    $('tab-dead').addEventListener('click', function () { setTab('dead'); });
    $('filter-state').addEventListener('change', function () { log.filter.state = this.value; resetJobs(); });
    var onText = debounce(function () {
      var t = $('filter-task').value.trim(), q = $('filter-queue').value.trim();
      if (t === log.filter.task && q === log.filter.queue) return;
      log.filter.task = t; log.filter.queue = q;
      resetJobs();
    }, 300);
    $('filter-task').addEventListener('input', onText);
    $('filter-queue').addEventListener('input', onText);
    $('filter-clear').addEventListener('click', function () {
      $('filter-task').value = ''; $('filter-queue').value = '';
      log.filter = { state: '', task: '', queue: '' };
      $('filter-state').value = log.tab === 'dead' ? 'dead' : '';
      resetJobs();
    });

    // detail
    $('detail-close').addEventListener('click', closeDetail);
    $('drawer-backdrop').addEventListener('click', closeDetail);
    $('cancel-button').addEventListener('click', function () { detailAction('cancel', this); });
    $('retry-button').addEventListener('click', function () { detailAction('retry', this); });
    $('discard-button').addEventListener('click', function () { detailAction('discard', this); });
    document.addEventListener('keydown', function (e) {
      if (e.key !== 'Escape') return;
      if (!$('token-dialog-backdrop').hidden) closeTokenDialog(null);
      else if (!$('job-detail').hidden) closeDetail();
    });

    // workers & queues
    $('workers-body').addEventListener('click', onWorkersClick);
    $('queues-body').addEventListener('click', onQueuesClick);

    // submit
    $('submit-form').addEventListener('submit', onSubmit);
    $('submit-payload').addEventListener('input', debounce(validatePayload, 200));
    $('submit-task-select').addEventListener('change', function () {
      if (this.value) { $('submit-task').value = this.value; $('submit-task').classList.remove('invalid'); }
    });
    $('submit-task').addEventListener('input', function () {
      var v = this.value.trim();
      var sel = $('submit-task-select');
      sel.value = state.tasks.known.indexOf(v) >= 0 ? v : '';
    });

    // token dialog
    $('token-button').addEventListener('click', function () { openTokenDialog(''); });
    $('token-dialog').addEventListener('submit', function (e) {
      e.preventDefault();
      var t = $('token-input').value.trim();
      if (!t) { $('token-error').textContent = 'Enter a token, or Cancel.'; return; }
      setToken(t);
      closeTokenDialog(t);
    });
    $('token-cancel').addEventListener('click', function () { closeTokenDialog(null); });
    $('token-clear').addEventListener('click', function () {
      setToken(''); $('token-input').value = '';
      toast('Token forgotten', 'ok');
      closeTokenDialog(null);
    });
    $('token-dialog-backdrop').addEventListener('click', function (e) { if (e.target === this) closeTokenDialog(null); });

    // chart interactions
    $('range-select').addEventListener('click', function (e) {
      var b = e.target.closest('button[data-range]');
      if (!b) return;
      state.range = parseInt(b.getAttribute('data-range'), 10);
      Array.prototype.forEach.call(this.querySelectorAll('button'), function (x) { x.classList.toggle('active', x === b); });
      renderThroughput();
    });
    var tpBox = $('throughput-chart');
    tpBox.addEventListener('mousemove', function (e) { tpHoverX = e.clientX; showTip(e.clientX); });
    tpBox.addEventListener('mouseleave', function () { tpHoverX = null; hideTip(); });
    if (typeof ResizeObserver !== 'undefined') {
      var lastW = {};
      var ro = new ResizeObserver(function (entries) {
        entries.forEach(function (en) {
          var id = en.target.id, w = Math.round(en.contentRect.width);
          if (lastW[id] === w) return;
          lastW[id] = w;
          if (id === 'throughput-chart') scheduleThroughputRender();
          else if (id === 'task-chart') renderTaskChart();
        });
      });
      ro.observe(tpBox); ro.observe($('task-chart'));
    }
    renderThroughput();

    setInterval(tick, 1000);
    setInterval(safetyRefresh, SAFETY_REFRESH_MS);
    document.addEventListener('visibilitychange', function () {
      if (!document.hidden && stream.everOpen) { loadStats(); loadWorkers(); }
    });
  }

  // exposed for debugging / browser tests
  window.trioqDashboard = {
    state: state, log: log, detail: detail,
    reloadJobs: resetJobs, openDetail: openDetail, closeDetail: closeDetail,
    domRowCount: function () { return $('job-log-body').rows.length; }
  };

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
