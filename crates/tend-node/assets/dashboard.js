// The tend fleet dashboard: reads /v1/status every two seconds and follows /v1/changes
// live, both with the API token as `Authorization: Bearer` (see api/dashboard.rs). Plain
// JavaScript, no libraries, no build step.
"use strict";

(() => {
  const TOKEN_KEY = "tend.api.token";
  const POLL_MS = 2000;
  const CHART_SECONDS = 300;
  const MAX_CHANGES = 50;

  const $ = (id) => document.getElementById(id);
  let token = null;
  let stopped = false;
  let pollTimer = null;
  let refreshSoon = null;
  const samples = []; // {t (s), sent, received}: sync counters over time

  class Unauthorized extends Error {}

  // The token: from `#token=...` (then removed from the address bar, kept for the tab
  // only), else from this tab's storage, else asked for.
  function takeToken() {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function askForToken(message) {
    stopped = true;
    clearTimeout(pollTimer);
    sessionStorage.removeItem(TOKEN_KEY);
    $("board").hidden = true;
    $("token-form").hidden = false;
    $("token-error").textContent = message || "";
    $("token-input").focus();
  }

  async function api(path) {
    const r = await fetch(path, {
      headers: { Authorization: "Bearer " + token },
      cache: "no-store",
    });
    if (r.status === 401) throw new Unauthorized("the API refused the token");
    if (!r.ok) {
      let msg = r.statusText;
      try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
      throw new Error(`${path}: ${r.status} ${msg}`);
    }
    return r.json();
  }

  // ---- rendering helpers ----

  function text(id, value) {
    const el = $(id);
    const s = value === undefined || value === null ? "—" : String(value);
    if (el.textContent !== s) el.textContent = s;
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "title") e.title = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  function fill(id, rows, columns, emptyText) {
    const body = $(id);
    body.replaceChildren();
    if (rows.length === 0) {
      body.append(el("tr", {}, el("td", { class: "empty", colspan: String(columns) }, emptyText)));
      return;
    }
    for (const r of rows) body.append(r);
  }

  const short = (id) => (id && id.length > 16 ? id.slice(0, 8) + "…" + id.slice(-6) : id || "—");
  const code = (s, full) => el("code", { title: full || s }, s);
  const num = (n) => (typeof n === "number" ? n.toLocaleString("en") : "—");

  function bytes(n) {
    if (typeof n !== "number") return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function ago(v) {
    if (v === undefined || v === null) return "never";
    if (typeof v === "string") {
      const t = Date.parse(v);
      if (Number.isNaN(t)) return v;
      v = t;
    }
    // Seconds or milliseconds since the Unix epoch.
    const ms = v < 1e12 ? v * 1000 : v;
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }

  // The peer's last sync, under whichever name the node reports it.
  function lastSync(p) {
    for (const k of ["last_sync", "last_sync_ms", "last_sync_unix_ms", "last_success", "last_success_ms", "last_sync_at"]) {
      if (p[k] !== undefined) return p[k];
    }
    return undefined;
  }

  // ---- the status ----

  function render(s) {
    const ns = (s.journal?.namespaces || []).find((n) => n.namespace === s.journal.current_namespace) || {};
    text("device-id", s.device_id);
    text("namespace", s.namespace);
    text("listen-addr", s.listen_addr);
    text("identity-epoch", s.identity_epoch);
    text("snapshot-epoch", ns.snapshot_epoch);
    text("current-epoch", ns.current_epoch);
    text("store-bytes", bytes(s.journal?.store_bytes));
    text("live-keys", num(s.app?.live_keys));
    text("log-entries", num(s.app?.log_entries));
    text("facts", num(ns.facts));
    text("changes-cursor", num(s.changes_cursor));

    renderMembers(s);
    renderPeers(s.peers || []);
    renderDigests(s, ns.digest);
    renderSnapshot(s.snapshot, s.sync);
    renderUpgrades(s.upgrades, s.upgrade_running);
    sample(s.sync);
    text("updated", new Date().toLocaleTimeString());
  }

  function renderMembers(s) {
    const a = s.authority;
    const list = $("members");
    list.replaceChildren();
    if (!a) {
      list.append(el("li", {}, "not a member of an authority yet"));
      text("threshold", "");
      return;
    }
    text("threshold", `threshold ${a.threshold} of ${a.members.length}, identity epoch ${a.identity_epoch}`);
    for (const m of a.members) {
      const li = el("li", { class: m === s.device_id ? "me" : "" }, code(short(m), m));
      if (m === s.device_id) li.append(el("span", { class: "tag" }, "this device"));
      if (m === a.admin) li.append(el("span", { class: "tag" }, "admin"));
      const peer = (s.peers || []).find((p) => p.device_id === m);
      if (peer) li.append(el("span", { class: "tag " + (peer.status === "online" ? "ok" : "warn") }, peer.status));
      list.append(li);
    }
  }

  function renderPeers(peers) {
    const rows = peers.map((p) => {
      const status = p.blocked ? "blocked" : p.status;
      const cls = status === "online" ? "ok" : status === "offline" ? "warn" : "bad";
      return el("tr", {},
        el("td", {}, code(short(p.device_id), p.device_id)),
        el("td", {}, p.addr ? code(p.addr) : "—"),
        el("td", { class: cls }, status),
        el("td", {}, typeof p.score === "number" ? p.score.toFixed(2) : "—"),
        el("td", {}, typeof p.trust === "number" ? p.trust.toFixed(2) : "—"),
        el("td", {}, `${num(p.successful_syncs)} / ${num(p.failed_syncs)}`),
        el("td", {}, num(p.active_sessions)),
        el("td", {}, ago(lastSync(p))));
    });
    fill("peers", rows, 8, "no peers known yet");
  }

  function renderDigests(s, mine) {
    const rows = [el("tr", {}, el("td", {}, "this device"), el("td", {}, code(short(mine), mine)))];
    const reported = (s.peers || []).filter((p) => typeof p.digest === "string");
    for (const p of reported) {
      const same = p.digest === mine;
      rows.push(el("tr", {},
        el("td", {}, code(short(p.device_id), p.device_id)),
        el("td", { class: same ? "ok" : "bad" }, code(short(p.digest), p.digest))));
    }
    fill("digests", rows, 2, "");
    const verdict = $("digest-verdict");
    if (reported.length === 0) {
      verdict.className = "verdict";
      verdict.textContent = "Peers report no digests here: this device's digest (compare it with theirs).";
    } else {
      const differ = reported.filter((p) => p.digest !== mine).length;
      verdict.className = "verdict " + (differ === 0 ? "ok" : "bad");
      verdict.textContent = differ === 0
        ? `All ${reported.length + 1} journals agree.`
        : `${differ} of ${reported.length} peers differ (sync pending).`;
    }
  }

  function renderSnapshot(snap, sync) {
    if (!snap) {
      for (const id of ["snapshot-latest", "snapshot-blob", "snapshot-proposals", "gc-policy"]) text(id, "—");
    } else {
      const l = snap.latest;
      text("snapshot-latest", l ? `epoch ${l.epoch}, digest ${short(l.digest)}` : "none yet");
      text("snapshot-blob", l ? `${short(l.blob_cid)} ${l.blob_stored ? "(stored)" : "(not fetched yet)"}` : "—");
      text("snapshot-proposals", snap.open_proposals.length === 0 ? "none"
        : snap.open_proposals.map((p) => `epoch ${p.target_epoch} by ${short(p.proposer)}`).join(", "));
      text("gc-policy", typeof snap.gc_policy === "string" ? snap.gc_policy : JSON.stringify(snap.gc_policy));
    }
    text("gc-runs", num(sync?.gc_runs));
    text("gc-pruned", num(sync?.gc_facts_pruned));
    text("gc-reclaimed", bytes(sync?.gc_bytes_reclaimed));
  }

  function renderUpgrades(u, running) {
    text("upgrade-running", running ? "installing" : "idle");
    if (!u) {
      text("running-version", "—");
      text("upgrade-policy", "—");
      fill("packages", [], 5, "unknown");
      return;
    }
    text("running-version", u.running_version);
    text("upgrade-policy", typeof u.policy === "string" ? u.policy : JSON.stringify(u.policy));
    const rows = (u.packages || []).map((p) => {
      const r = p.readiness || {};
      const ready = Array.isArray(r.ready) && Array.isArray(r.eligible)
        ? `${r.ready.length} / ${r.eligible.length} (needs ${r.required})${r.satisfied ? " ✓" : ""}`
        : "—";
      const outcome = (o) => Object.values(o).map((v) => (typeof v === "object" ? JSON.stringify(v) : v)).join(" ");
      const here = p.local ? (typeof p.local === "string" ? p.local : outcome(p.local))
        : p.in_cohort ? "pending" : "not in cohort";
      return el("tr", {},
        el("td", {}, `${p.version}${p.activated ? " (activated)" : ""}`),
        el("td", {}, `${p.cohort_percent}%`),
        el("td", {}, ready),
        el("td", {}, p.fence ?? "—"),
        el("td", {}, here));
    });
    fill("packages", rows, 5, "no packages published");
  }

  // ---- the throughput chart (inline SVG from the status samples) ----

  function sample(sync) {
    if (!sync) return;
    const t = Date.now() / 1000;
    samples.push({ t, sent: sync.facts_sent, received: sync.facts_received });
    while (samples.length > 2 && samples[0].t < t - CHART_SECONDS - POLL_MS / 1000) samples.shift();
    text("totals", `· totals: ${num(sync.facts_sent)} sent, ${num(sync.facts_received)} received, ${bytes(sync.bytes_sent)} out, ${bytes(sync.bytes_received)} in`);
    drawChart(t);
  }

  function drawChart(now) {
    const svg = $("chart");
    const W = 600, H = 140, top = 12, bottom = 16;
    const rates = [];
    for (let i = 1; i < samples.length; i++) {
      const a = samples[i - 1], b = samples[i];
      const dt = Math.max(b.t - a.t, 0.001);
      rates.push({ t: b.t, sent: Math.max(0, b.sent - a.sent) / dt, received: Math.max(0, b.received - a.received) / dt });
    }
    const peak = Math.max(1, ...rates.map((r) => Math.max(r.sent, r.received)));
    // The last five minutes, or since the page opened (at least one minute).
    const span = Math.min(CHART_SECONDS, Math.max(60, now - (samples[0]?.t ?? now)));
    const x = (t) => W - ((now - t) / span) * W;
    const y = (v) => H - bottom - (v / peak) * (H - top - bottom);
    const ns = "http://www.w3.org/2000/svg";
    const node = (tag, attrs) => {
      const e = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      return e;
    };
    svg.replaceChildren();
    for (const f of [0, 0.5, 1]) {
      svg.append(node("line", { class: "grid", x1: 0, x2: W, y1: y(peak * f), y2: y(peak * f) }));
    }
    text("chart-peak", `${peak.toFixed(peak < 10 ? 1 : 0)} facts/s`);
    text("chart-span", span >= 120 ? `−${Math.round(span / 60)} min` : `−${Math.round(span)} s`);
    for (const key of ["sent", "received"]) {
      if (rates.length === 0) continue;
      const pts = rates.map((r) => `${x(r.t).toFixed(1)},${y(r[key]).toFixed(1)}`).join(" ");
      svg.append(node("polyline", { class: key, points: pts }));
    }
  }

  // ---- the changes feed (Server-Sent Events read through fetch) ----

  function describe(c) {
    if (c.collection !== undefined && c.key !== undefined) return `${c.collection}/${c.key}`;
    if (c.log !== undefined) return c.log_cursor ? `${c.log} @ ${short(c.log_cursor)}` : c.log;
    if (c.key !== undefined) return `cache ${c.key}`;
    return c.kind;
  }

  function onChange(c) {
    const body = $("changes");
    if (body.querySelector("td.empty")) body.replaceChildren();
    body.prepend(el("tr", { class: "fresh" },
      el("td", {}, c.cursor),
      el("td", {}, c.op === "other" ? c.kind : c.op),
      el("td", {}, describe(c)),
      el("td", {}, code(short(c.author), c.author)),
      el("td", {}, c.epoch)));
    while (body.rows.length > MAX_CHANGES) body.deleteRow(-1);
    // The counts moved: read the status again soon (one read for a burst of changes).
    if (!refreshSoon) {
      refreshSoon = setTimeout(() => { refreshSoon = null; refresh(); }, 150);
    }
  }

  function setFeed(state) {
    const pill = $("feed-state");
    pill.className = "pill " + (state === "live" ? "on" : state === "down" ? "bad" : "off");
    pill.textContent = state === "live" ? "live" : state === "down" ? "feed lost, retrying" : "connecting";
  }

  async function follow() {
    let cursor = "now";
    while (!stopped) {
      try {
        const r = await fetch("/v1/changes?since=" + encodeURIComponent(cursor), {
          headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" },
          cache: "no-store",
        });
        if (r.status === 401) throw new Unauthorized("the API refused the token");
        if (!r.ok || !r.body) throw new Error("the changes feed answered " + r.status);
        setFeed("live");
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done || stopped) break;
          buf += value.replace(/\r\n?/g, "\n");
          let end;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            const ev = { event: "message", id: null, data: [] };
            for (const line of block.split("\n")) {
              if (line.startsWith(":")) continue;
              const i = line.indexOf(":");
              const field = i < 0 ? line : line.slice(0, i);
              const v = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (field === "event") ev.event = v;
              else if (field === "id") ev.id = v;
              else if (field === "data") ev.data.push(v);
            }
            if (ev.id !== null) cursor = ev.id;
            if (ev.event === "change" && ev.data.length) onChange(JSON.parse(ev.data.join("\n")));
          }
        }
      } catch (e) {
        if (e instanceof Unauthorized) { askForToken(e.message); return; }
      }
      if (stopped) return;
      setFeed("down");
      await new Promise((res) => setTimeout(res, 1000));
    }
  }

  // ---- polling ----

  async function refresh() {
    if (stopped) return;
    try {
      render(await api("/v1/status"));
    } catch (e) {
      if (e instanceof Unauthorized) { askForToken(e.message); return; }
      text("updated", "failed: " + e.message);
    }
  }

  function poll() {
    clearTimeout(pollTimer);
    refresh().finally(() => { if (!stopped) pollTimer = setTimeout(poll, POLL_MS); });
  }

  function start() {
    stopped = false;
    $("token-form").hidden = true;
    $("board").hidden = false;
    fill("changes", [], 5, "waiting for changes…");
    poll();
    follow();
  }

  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token-input").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    token = t;
    $("token-input").value = "";
    start();
  });

  token = takeToken();
  if (token) start();
  else askForToken("");
})();
