// The presence-gateway dashboard: the per-source overview of GET /v1/sources
// (counters, a sparkline of accepted events per minute over the last hour,
// the availability distribution of the source's records as a stacked bar),
// the current presence table and, when the gateway has a people mapping, the
// People view, both kept live by one GET /v1/stream.
//
// The consumer token (when the gateway has tokens) comes from the URL
// fragment (#token=..., never sent to the server) or the login form, and is
// kept in sessionStorage. EventSource cannot send headers, so the stream
// carries it as access_token; fetches send it as a bearer token.
//
// Charts are inline SVG built here: the page loads nothing from elsewhere
// (its Content-Security-Policy allows only its own script and style).
"use strict";

const MAX_ROWS = 500;
const SOURCES_EVERY_MS = 5000;
const PEOPLE_PAGE = 500;
// The SVG namespace: an identifier, not something the page fetches.
const SVG = "http://www.w3.org/2000/svg";
// DESIGN §2's order: the stacked bar's segments and its legend follow it.
const AVAILABILITIES = ["available", "available_idle", "away", "be_right_back",
  "busy", "busy_idle", "do_not_disturb", "offline", "unknown"];

const records = new Map(); // "source\u0000principal" -> presence record
const changed = new Set(); // presence keys changed since the last render
const people = new Map(); // person id -> person record
const peopleChanged = new Set();
let stream = null;
let renderQueued = false;
let sourcesTimer = null;
let connects = 0; // generation of connect(): a newer call supersedes an older one
let peopleMode = false; // the gateway serves /v1/people
let mapping = null; // the people mapping's status, from GET /v1/people
let filledVersion = null; // mapping version of the last complete fill
let filling = null; // ids a fill in progress has seen (stream events count too)

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
  if (!response.ok) {
    throw Object.assign(new Error(path + ": " + response.status), { status: response.status });
  }
  return response.json();
}

// Connects: asks whether the gateway has people (GET /v1/people answers
// 404 without a people mapping), then opens the one stream that carries
// what the page shows.
async function connect() {
  const generation = ++connects;
  $("login").hidden = true;
  if (stream) { stream.close(); stream = null; }
  setConnection("connecting", "connecting");
  let first = null;
  try {
    first = await fetchJson(`/v1/people?limit=${PEOPLE_PAGE}`);
  } catch (e) {
    if (generation !== connects) return;
    if (e.status === 401) { askForToken(token() ? "the token was refused" : ""); return; }
    if (e.status !== 404) {
      // The gateway is not there (yet): try again shortly.
      setConnection("offline", "disconnected");
      setTimeout(() => { if (generation === connects) connect(); }, 2000);
      return;
    }
  }
  if (generation !== connects) return;
  setPeopleMode(first !== null);
  openStream();
  clearInterval(sourcesTimer);
  refreshSources();
  sourcesTimer = setInterval(refreshSources, SOURCES_EVERY_MS);
  if (first) fillPeople(first);
}

function openStream() {
  const params = new URLSearchParams();
  if (peopleMode) { params.set("people", "true"); params.set("presence", "true"); }
  const t = token();
  if (t) params.set("access_token", t);
  const query = params.toString();
  const es = new EventSource("/v1/stream" + (query ? "?" + query : ""));
  stream = es;
  // A new EventSource starts without Last-Event-ID, so the gateway sends the
  // whole snapshot: drop the presence the previous one left. (The browser's
  // own reconnects keep Last-Event-ID and get only what was missed, or a
  // reset.) People are refilled by connect() and the snapshot together.
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
      stream = null;
      const retry = () => { setConnection("offline", "disconnected"); setTimeout(connect, 2000); };
      fetchJson("/v1/sources").then(retry,
        (e) => (e.status === 401 ? askForToken("the token was refused") : retry()));
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
  es.addEventListener("person", (event) => {
    // The stream is in order: its record is the latest whatever it says.
    const record = JSON.parse(event.data);
    people.set(record.person, record);
    peopleChanged.add(record.person);
    if (filling) filling.add(record.person);
    queueRender();
  });
  es.addEventListener("reset", () => {
    // The snapshot follows (people included): start over from it.
    records.clear();
    people.clear();
    queueRender();
  });
}

// Shows or hides the People tab.
function setPeopleMode(on) {
  peopleMode = on;
  // One view needs no tabs.
  document.querySelector(".tabs").hidden = !on;
  $("tab-people").hidden = !on;
  if (!on && $("tab-people").getAttribute("aria-selected") === "true") selectTab("tab-presence");
}

function selectTab(id) {
  for (const tab of document.querySelectorAll(".tabs [role=tab]")) {
    const selected = tab.id === id;
    tab.setAttribute("aria-selected", String(selected));
    $(tab.dataset.view).hidden = !selected;
  }
  sessionStorage.setItem("pg-tab", id);
  queueRender();
}

// Reads every page of GET /v1/people (`first` is the first one). A record
// from a page only fills a gap or replaces an older one: the stream may
// have delivered a newer one meanwhile. When the fill is complete, people
// it did not see (and the stream did not send meanwhile) are no longer in
// the mapping, and leave the view.
async function fillPeople(first) {
  const generation = connects;
  const seen = new Set();
  filling = seen;
  let page = first;
  try {
    for (;;) {
      if (generation !== connects) return;
      mapping = page.mapping || mapping;
      for (const record of page.items || []) {
        seen.add(record.person);
        const held = people.get(record.person);
        if (!held || record.seq > held.seq) {
          people.set(record.person, record);
          peopleChanged.add(record.person);
        }
      }
      queueRender();
      if (!page.next_cursor) break;
      page = await fetchJson(`/v1/people?limit=${PEOPLE_PAGE}&cursor=${encodeURIComponent(page.next_cursor)}`);
    }
    for (const id of [...people.keys()]) {
      if (!seen.has(id)) people.delete(id);
    }
    filledVersion = mapping ? mapping.version : null;
  } catch (e) {
    // The next refresh tries again (filledVersion is unchanged).
  } finally {
    if (filling === seen) filling = null;
    queueRender();
  }
}

// The people mapping's status; a new version (a reload) refills the view.
async function refreshMapping() {
  if (!peopleMode || filling) return;
  try {
    const page = await fetchJson("/v1/people?limit=1");
    mapping = page.mapping || null;
    if (mapping && mapping.version !== filledVersion) {
      fillPeople(await fetchJson(`/v1/people?limit=${PEOPLE_PAGE}`));
    }
    queueRender();
  } catch (e) {
    if (e.status === 401) askForToken(token() ? "the token was refused" : "");
  }
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

function words(text) {
  return text ? text.replace(/_/g, " ") : "";
}

function badge(availability, small) {
  const b = document.createElement("span");
  b.className = "badge " + availability + (small ? " small" : "");
  b.textContent = words(availability);
  return b;
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
  if (!$("presence-view").hidden) renderPresence();
  changed.clear();
  if (!$("people-view").hidden) renderPeople();
  peopleChanged.clear();
}

function renderPresence() {
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
    row.insertCell().appendChild(badge(r.availability));
    cell(row, words(r.activity));
    cell(row, r.status_text);
    cell(row, since(r.observed_at)).title = r.observed_at;
  }
  $("rows").replaceWith(body);
  $("count").textContent = matching.length > MAX_ROWS
    ? `showing ${MAX_ROWS} of ${matching.length} (refine the filter)`
    : `${matching.length} of ${records.size}`;
}

function renderPeople() {
  const needle = $("people-filter").value.trim().toLowerCase();
  const matching = [];
  for (const p of people.values()) {
    const text = [p.person, p.name, p.availability, p.activity, p.status_text,
      ...(p.sources || []).flatMap((r) => [r.source, r.principal])]
      .filter(Boolean).join(" ").toLowerCase();
    if (!needle || text.includes(needle)) matching.push(p);
  }
  const label = (p) => (p.name || p.person).toLowerCase();
  matching.sort((a, b) => label(a).localeCompare(label(b)) || (a.person < b.person ? -1 : 1));
  const body = document.createElement("tbody");
  body.id = "people-rows";
  for (const p of matching.slice(0, MAX_ROWS)) {
    const row = body.insertRow();
    row.dataset.person = p.person;
    row.dataset.availability = p.availability;
    row.dataset.decidedBy = p.decided_by ? p.decided_by.source : "";
    if (peopleChanged.has(p.person)) row.className = "changed";
    const who = row.insertCell();
    who.className = "person";
    who.append(p.name || p.person);
    if (p.name) {
      const id = document.createElement("span");
      id.className = "id";
      id.textContent = p.person;
      who.append(id);
    }
    row.insertCell().appendChild(badge(p.availability));
    const activity = cell(row, words(p.activity));
    if (p.status_text) activity.title = p.status_text;
    const decided = row.insertCell();
    decided.className = "decided";
    if (p.decided_by) {
      decided.append(p.decided_by.source + " ");
      const principal = document.createElement("span");
      principal.className = "principal";
      principal.textContent = p.decided_by.principal;
      decided.append(principal);
    } else {
      const none = document.createElement("span");
      none.className = "none";
      none.textContent = "no record";
      decided.append(none);
    }
    const list = document.createElement("ul");
    list.className = "identities";
    for (const held of p.sources || []) {
      // A change of an identity that does not change the person sends no
      // person event: show the newer presence record when the page has it.
      const live = records.get(held.source + "\u0000" + held.principal);
      const r = live && live.seq > held.seq ? live : held;
      const item = document.createElement("li");
      item.dataset.source = r.source;
      item.dataset.principal = r.principal;
      item.dataset.availability = r.availability;
      const principal = document.createElement("span");
      principal.className = "principal";
      principal.textContent = r.principal;
      item.append(r.source + " ", principal, " ", badge(r.availability, true));
      list.append(item);
    }
    if (!list.firstChild) {
      const none = document.createElement("li");
      none.className = "none";
      none.textContent = "no identity has a record";
      list.append(none);
    }
    row.insertCell().append(list);
    cell(row, since(p.observed_at)).title = p.observed_at || "";
  }
  $("people-rows").replaceWith(body);
  $("people-count").textContent = matching.length > MAX_ROWS
    ? `showing ${MAX_ROWS} of ${matching.length} (refine the filter)`
    : `${matching.length} of ${people.size}`;
  renderMapping();
}

function renderMapping() {
  const el = $("mapping");
  el.textContent = "";
  if (!mapping) return;
  const loaded = mapping.loaded_at ? ", loaded " + new Date(mapping.loaded_at).toLocaleString() : "";
  el.append(`mapping version ${mapping.version}, ${mapping.people} people${loaded}`);
  if (mapping.last_error) {
    const error = document.createElement("span");
    error.className = "error";
    error.textContent = ` (last reload failed: ${mapping.last_error.message})`;
    el.append(error);
  }
}

function svg(name, attributes) {
  const el = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes || {})) el.setAttribute(key, value);
  return el;
}

function svgTitle(parent, text) {
  const title = svg("title");
  title.textContent = text;
  parent.append(title);
}

// Accepted events per minute over the last hour: a line over an area,
// scaled to the hour's busiest minute.
function sparkline(perMinute) {
  const values = (perMinute || []).map(Number);
  const width = Math.max(values.length - 1, 1);
  const height = 20;
  const peak = Math.max(0, ...values);
  const y = (v) => (height - 1 - (peak ? (v / peak) * (height - 2) : 0)).toFixed(2);
  const points = values.map((v, i) => `${i},${y(v)}`).join(" ");
  const chart = svg("svg", { class: "spark", viewBox: `0 0 ${width} ${height}`,
    preserveAspectRatio: "none", role: "img" });
  const total = values.reduce((a, b) => a + b, 0);
  const now = values.length ? values[values.length - 1] : 0;
  chart.dataset.values = values.join(",");
  chart.dataset.total = String(total);
  chart.setAttribute("aria-label", `accepted per minute over the last hour: ${total} in all, ${now} this minute, at most ${peak}`);
  svgTitle(chart, chart.getAttribute("aria-label"));
  if (values.length) {
    chart.append(svg("polygon", { class: "area", points: `0,${height} ${points} ${width},${height}` }));
    chart.append(svg("polyline", { class: "line", points }));
  }
  const box = document.createElement("div");
  box.className = "chart";
  const caption = document.createElement("div");
  caption.className = "caption";
  const left = document.createElement("span");
  left.textContent = "accepted/min, last hour";
  const right = document.createElement("span");
  right.textContent = `now ${now} · peak ${peak}`;
  caption.append(left, right);
  box.append(chart, caption);
  return box;
}

// The source's records per availability as one bar of segments, with a
// legend of the values present.
function distribution(counts) {
  counts = counts || {};
  const total = AVAILABILITIES.reduce((sum, a) => sum + (counts[a] || 0), 0);
  const bar = svg("svg", { class: "dist", viewBox: "0 0 100 10", preserveAspectRatio: "none",
    role: "img" });
  bar.dataset.total = String(total);
  const legend = document.createElement("ul");
  legend.className = "legend";
  let x = 0;
  const parts = [];
  for (const a of AVAILABILITIES) {
    const n = counts[a] || 0;
    if (!n) continue;
    const width = (n / total) * 100;
    const share = Math.round(width);
    const rect = svg("rect", { class: "seg " + a, x: x.toFixed(3), y: 0,
      width: width.toFixed(3), height: 10 });
    rect.dataset.availability = a;
    rect.dataset.count = String(n);
    svgTitle(rect, `${words(a)}: ${n} (${share}%)`);
    bar.append(rect);
    x += width;
    parts.push(`${words(a)} ${n}`);
    const item = document.createElement("li");
    item.dataset.availability = a;
    const swatch = document.createElement("span");
    swatch.className = "swatch " + a;
    item.append(swatch, `${words(a)} ${n}`);
    legend.append(item);
  }
  bar.setAttribute("aria-label", total ? `records by availability: ${parts.join(", ")}` : "no records");
  if (!total) svgTitle(bar, "no records");
  const box = document.createElement("div");
  box.className = "chart";
  box.append(bar, legend);
  return box;
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
    card.appendChild(sparkline(s.accepted_per_minute));
    card.appendChild(distribution(s.availability));
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
  refreshMapping();
}

document.addEventListener("DOMContentLoaded", () => {
  $("filter").addEventListener("input", queueRender);
  $("people-filter").addEventListener("input", queueRender);
  for (const tab of document.querySelectorAll(".tabs [role=tab]")) {
    tab.addEventListener("click", () => selectTab(tab.id));
  }
  const tab = sessionStorage.getItem("pg-tab");
  if (tab && $(tab)) selectTab(tab);
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("pg-token", $("token").value);
    connect();
  });
  // "Since" ages even when nothing changes.
  setInterval(queueRender, 15000);
  connect();
});
