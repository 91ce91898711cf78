// The presence-gateway dashboard: the current presence table, kept live by
// GET /v1/stream, and the per-source counters of GET /v1/sources.
//
// The consumer token (when the gateway has tokens) comes from the URL
// fragment (#token=..., never sent to the server) or the login form, and is
// kept in sessionStorage. EventSource cannot send headers, so the stream
// carries it as access_token; fetches send it as a bearer token.
"use strict";

const MAX_ROWS = 500;
const SOURCES_EVERY_MS = 5000;

const records = new Map(); // "source\u0000principal" -> record
const changed = new Set(); // keys changed since the last render
let stream = null;
let renderQueued = false;
let sourcesTimer = null;

const $ = (id) => document.getElementById(id);

function token() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.has("token")) {
    sessionStorage.setItem("pg-token", hash.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("pg-token") || "";
}

function setConnection(state, text) {
  const el = $("connection");
  el.className = "connection " + state;
  el.textContent = text;
}

function askForToken(message) {
  if (stream) { stream.close(); stream = null; }
  clearInterval(sourcesTimer);
  setConnection("offline", "not connected");
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function fetchJson(path) {
  const headers = {};
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) throw Object.assign(new Error("unauthorized"), { status: 401 });
  if (!response.ok) throw new Error(path + ": " + response.status);
  return response.json();
}

function connect() {
  $("login").hidden = true;
  if (stream) stream.close();
  const t = token();
  const url = "/v1/stream" + (t ? "?access_token=" + encodeURIComponent(t) : "");
  setConnection("connecting", "connecting");
  const es = new EventSource(url);
  stream = es;
  // A new EventSource starts without Last-Event-ID, so the gateway sends the
  // whole snapshot: drop what the previous one left. (The browser's own
  // reconnects keep Last-Event-ID and get only what was missed, or a reset.)
  let fresh = true;
  es.onopen = () => {
    if (fresh) {
      fresh = false;
      records.clear();
      queueRender();
    }
    setConnection("live", "live");
  };
  es.onerror = () => {
    if (stream !== es) return; // replaced meanwhile
    if (es.readyState === EventSource.CLOSED) {
      // Not a stream at all (401, for instance): find out why.
      fetchJson("/v1/sources").then(
        () => { setConnection("offline", "disconnected"); setTimeout(connect, 2000); },
        (e) => e.status === 401 ? askForToken("the token was refused")
                                : (setConnection("offline", "disconnected"), setTimeout(connect, 2000)));
    } else {
      // The browser reconnects by itself, with Last-Event-ID.
      setConnection("reconnecting", "reconnecting");
    }
  };
  es.addEventListener("presence", (event) => {
    const record = JSON.parse(event.data);
    const key = record.source + "\u0000" + record.principal;
    records.set(key, record);
    changed.add(key);
    queueRender();
  });
  es.addEventListener("reset", () => {
    // The snapshot follows: start over from it.
    records.clear();
    queueRender();
  });
  clearInterval(sourcesTimer);
  refreshSources();
  sourcesTimer = setInterval(refreshSources, SOURCES_EVERY_MS);
}

function queueRender() {
  if (!renderQueued) {
    renderQueued = true;
    requestAnimationFrame(render);
  }
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text == null ? "" : text;
  if (className) td.className = className;
  return td;
}

function since(observedAt) {
  const then = Date.parse(observedAt);
  if (Number.isNaN(then)) return "";
  const secs = Math.max(0, Math.round((Date.now() - then) / 1000));
  if (secs < 60) return secs + " s ago";
  if (secs < 3600) return Math.round(secs / 60) + " min ago";
  if (secs < 86400) return Math.round(secs / 3600) + " h ago";
  return new Date(then).toLocaleString();
}

function render() {
  renderQueued = false;
  const needle = $("filter").value.trim().toLowerCase();
  const matching = [];
  for (const [key, r] of records) {
    const text = [r.source, r.principal, r.availability, r.activity, r.status_text]
      .filter(Boolean).join(" ").toLowerCase();
    if (!needle || text.includes(needle)) matching.push([key, r]);
  }
  matching.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  const body = document.createElement("tbody");
  body.id = "rows";
  for (const [key, r] of matching.slice(0, MAX_ROWS)) {
    const row = body.insertRow();
    row.dataset.source = r.source;
    row.dataset.principal = r.principal;
    row.dataset.availability = r.availability;
    if (changed.has(key)) row.className = "changed";
    cell(row, r.source);
    cell(row, r.principal, "principal");
    const badge = document.createElement("span");
    badge.className = "badge " + r.availability;
    badge.textContent = r.availability.replace(/_/g, " ");
    row.insertCell().appendChild(badge);
    cell(row, r.activity ? r.activity.replace(/_/g, " ") : "");
    cell(row, r.status_text);
    cell(row, since(r.observed_at)).title = r.observed_at;
  }
  changed.clear();
  $("rows").replaceWith(body);
  $("count").textContent = matching.length > MAX_ROWS
    ? `showing ${MAX_ROWS} of ${matching.length} (refine the filter)`
    : `${matching.length} of ${records.size}`;
}

function renderSources(view) {
  const box = document.createElement("section");
  box.id = "sources";
  box.setAttribute("aria-label", "Sources");
  for (const s of view.sources) {
    const card = document.createElement("div");
    card.className = "source";
    card.dataset.source = s.id;
    const title = document.createElement("h2");
    title.textContent = s.id + " ";
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = s.kind;
    title.appendChild(kind);
    card.appendChild(title);
    const list = document.createElement("dl");
    const rejected = Object.values(s.counters.rejected || {}).reduce((a, b) => a + b, 0);
    const rows = [["records", s.records], ["received", s.counters.received],
      ["accepted", s.counters.accepted], ["changed", s.counters.changed],
      ["duplicate", s.counters.duplicate], ["stale", s.counters.stale],
      ["ignored", s.counters.ignored], ["rejected", rejected]];
    for (const [name, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.counter = name;
      list.append(dt, dd);
    }
    card.appendChild(list);
    for (const sub of s.subscriptions || []) {
      const line = document.createElement("div");
      line.className = "subscription state-" + sub.state.split(":")[0];
      line.textContent = `${sub.kind}: ${sub.state}` +
        (sub.expires_at ? ` (expires ${new Date(sub.expires_at).toLocaleTimeString()})` : "");
      card.appendChild(line);
    }
    box.appendChild(card);
  }
  $("sources").replaceWith(box);
}

async function refreshSources() {
  try {
    renderSources(await fetchJson("/v1/sources"));
  } catch (e) {
    if (e.status === 401) askForToken(token() ? "the token was refused" : "");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("filter").addEventListener("input", queueRender);
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("pg-token", $("token").value);
    connect();
  });
  // "Since" ages even when nothing changes.
  setInterval(queueRender, 15000);
  connect();
});
