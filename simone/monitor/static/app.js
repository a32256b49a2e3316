// SIM-ONE monitor: the dashboard page. Loads one run's downsampled data once, then follows
// server-sent events. Every text from a run (log lines, samples, errors, names) is put in
// the page with textContent, never as HTML.
"use strict";

const TRAIN_CHARTS = [
  { id: "loss", title: "Loss", traces: [
      { key: "train/loss", name: "train" },
      { key: "eval/val_loss", name: "validation", markers: true }] },
  { id: "domain-loss", title: "Validation loss per domain", match: /^domain\/(.+)\/loss$/, markers: true },
  { id: "bpb", title: "Bits per byte (validation)", traces: [{ key: "eval/val_bpb", name: "all", markers: true }],
    match: /^domain\/(.+)\/bpb$/, markers: true },
  { id: "lr", title: "Learning rate", traces: [{ key: "train/lr", name: "lr" }], format: ".2e" },
  { id: "grad", title: "Gradient norm", traces: [{ key: "train/grad_norm", name: "grad norm" }] },
  { id: "tps", title: "Tokens / s", traces: [{ key: "train/tokens_per_s", name: "tokens/s" }] },
  { id: "mfu", title: "MFU", traces: [{ key: "train/mfu", name: "MFU" }], format: ".1%" },
];
const SYSTEM_CHARTS = [
  { id: "cpu", title: "CPU %", time: true, traces: [{ key: "system/cpu_percent", name: "CPU" }], range: [0, 100] },
  { id: "ram", title: "Memory (GB)", time: true, traces: [
      { key: "system/ram_used_gb", name: "RAM used" }, { key: "system/rss_gb", name: "trainer RSS" }] },
  { id: "disk", title: "Disk free (GB)", time: true, traces: [{ key: "system/disk_free_gb", name: "free" }] },
  { id: "gpu-util", title: "GPU utilisation %", time: true, match: /^gpu(\d+)\/util$/, prefix: "GPU ", range: [0, 100], gpu: true },
  { id: "gpu-mem", title: "GPU memory (GB)", time: true, match: /^gpu(\d+)\/mem_used_gb$/, prefix: "GPU ", gpu: true },
  { id: "gpu-temp", title: "GPU temperature (°C)", time: true, match: /^gpu(\d+)\/temp_c$/, prefix: "GPU ", gpu: true },
  { id: "gpu-power", title: "GPU power (W)", time: true, match: /^gpu(\d+)\/power_w$/, prefix: "GPU ", gpu: true },
];
const COLORS = ["#58a6ff", "#f0883e", "#3fb950", "#bc8cff", "#ff7b72", "#d29922", "#39c5cf", "#e86bb0"];
const MAX_POINTS = 6000;      // per series in the browser; older points are thinned beyond this
const LOG_LINES = 500;
const MAX_SAMPLES = 12;
const MAX_EVENTS = 200;

const ui = {
  runs: [], selected: null, runSource: null, runsSource: null, seq: 0,
  series: {}, charts: {}, dirty: new Set(), summary: null, summaryAt: 0,
  samples: [], compare: new Set(), resyncTimer: null,
};
const $ = (id) => document.getElementById(id);

// ----------------------------------------------------------------------------- formatting
// Values come from files a trainer wrote: a number may arrive as text ("lr": "warmup"), so
// every formatter shows what is not a finite number as text instead of throwing (a throw
// would stop the rest of the header from updating).

const isNum = (v) => typeof v === "number" && Number.isFinite(v);

function fmtNum(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  return v.toFixed(digits);
}
function fmtExp(v, digits = 2) {
  if (v === null || v === undefined) return "–";
  return isNum(v) ? v.toExponential(digits) : String(v);
}
function fmtCompact(v) {
  if (v === null || v === undefined) return "–";
  if (!isNum(v)) return String(v);
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(2) + "B";
  if (a >= 1e6) return (v / 1e6).toFixed(2) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
  return v.toFixed(a >= 100 ? 0 : 1);
}
function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}
function fmtBytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(u.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return (n / 1024 ** i).toFixed(i ? 1 : 0) + " " + u[i];
}
function fmtTime(t) {
  return t ? new Date(t * 1000).toLocaleTimeString() : "";
}
// Plotly renders a subset of HTML in trace names (<b>, <i>, <br>, <a href>...); names from a
// run (run names, domain names) are escaped so they show exactly as written.
function plotlyText(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

// ----------------------------------------------------------------------------- run list

// The list is updated in place (items keyed by run name): it changes every second while a
// run trains, and rebuilding it would swap the checkbox or item under a user's click.
function renderRunList() {
  const list = $("run-list");
  const existing = new Map(Array.from(list.children, (item) => [item.dataset.run, item]));
  const items = ui.runs.map((r) => {
    const item = existing.get(r.name) || newRunItem(r.name);
    updateRunItem(item, r);
    return item;
  });
  if (items.length !== list.children.length || items.some((item, i) => list.children[i] !== item)) {
    list.replaceChildren(...items);
  }
  $("empty").hidden = ui.runs.length > 0;
  if (!ui.runs.length) $("run-view").hidden = true;
}

function newRunItem(name) {
  const item = el("div", "run-item");
  item.dataset.run = name;
  const box = el("input");
  box.type = "checkbox";
  box.title = "include in comparison";
  box.addEventListener("click", (e) => {
    e.stopPropagation();
    if (box.checked) ui.compare.add(name); else ui.compare.delete(name);
  });
  const bar = el("div", "mini-progress");
  bar.append(el("div"));
  item.append(box, el("div", "run-item-name", name), el("div", "run-item-meta"), bar);
  item.addEventListener("click", () => selectRun(name));
  return item;
}

function updateRunItem(item, r) {
  item.className = "run-item" + (r.name === ui.selected ? " selected" : "");
  item.querySelector("input").checked = ui.compare.has(r.name);
  const meta = item.querySelector(".run-item-meta");
  const parts = [el("span", "badge state-" + r.state, r.state)];
  if (r.preset) parts.push(el("span", null, r.preset));
  if (r.step !== null && r.step !== undefined) parts.push(el("span", null, `step ${r.step}${r.total_steps ? "/" + r.total_steps : ""}`));
  meta.replaceChildren(...parts);
  item.querySelector(".mini-progress > div").style.width = (isNum(r.progress) ? r.progress * 100 : 0).toFixed(1) + "%";
}

function onRuns(runs) {
  ui.runs = runs;
  renderRunList();
  const wanted = new URLSearchParams(location.hash.slice(1)).get("run");
  if (!ui.selected && runs.length) selectRun(runs.find((r) => r.name === wanted) ? wanted : runs[0].name);
}

function connectRuns() {
  ui.runsSource = new EventSource("/api/stream/runs");
  ui.runsSource.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    if (msg.type === "runs") onRuns(msg.runs);
  };
}

// ----------------------------------------------------------------------------- one run

async function selectRun(name) {
  if (ui.runSource) { ui.runSource.close(); ui.runSource = null; }
  ui.selected = name;
  history.replaceState(null, "", "#run=" + encodeURIComponent(name));
  renderRunList();
  await loadSnapshot(name);
}

async function loadSnapshot(name) {
  setConn("wait", "loading…");
  let data;
  try {
    const resp = await fetch("/api/runs/" + encodeURIComponent(name), { cache: "no-store" });
    if (!resp.ok) throw new Error(resp.status + " " + resp.statusText);
    data = await resp.json();
  } catch (err) {
    setConn("down", "cannot load run: " + err.message);
    return;
  }
  if (ui.selected !== name) return;
  $("run-view").hidden = false;
  ui.seq = data.seq;
  ui.series = {};
  for (const [key, xy] of Object.entries(data.series)) ui.series[key] = { x: xy[0], y: xy[1] };
  ui.samples = data.samples.slice(-MAX_SAMPLES);
  buildCharts();
  renderSummary(data.summary);
  renderLog(data.log, true);
  renderEvents(data.events, true);
  renderSamples();
  renderCheckpoints(data.checkpoints);
  renderLinks(data.links);
  openRunStream(name);
}

function openRunStream(name) {
  if (ui.runSource) ui.runSource.close();
  const src = new EventSource(`/api/stream/run/${encodeURIComponent(name)}?since=${ui.seq}`);
  ui.runSource = src;
  src.onopen = () => setConn("live", "live");
  src.onerror = () => setConn(src.readyState === EventSource.CLOSED ? "down" : "wait", "reconnecting…");
  src.onmessage = (e) => {
    if (ui.runSource !== src) return;
    const msg = JSON.parse(e.data);
    if (msg.seq) ui.seq = msg.seq;
    switch (msg.type) {
      case "metrics": onPoints(msg.points); if (msg.events.length) renderEvents(msg.events, false); break;
      case "log": renderLog(msg.lines, false); break;
      case "samples": ui.samples = ui.samples.concat(msg.samples).slice(-MAX_SAMPLES); renderSamples(); break;
      case "status": renderSummary(msg.summary); break;
      case "checkpoints": renderCheckpoints(msg.checkpoints); break;
      case "resync": scheduleResync(); break;
    }
  };
}

function scheduleResync() {
  clearTimeout(ui.resyncTimer);
  ui.resyncTimer = setTimeout(() => { if (ui.selected) loadSnapshot(ui.selected); }, 300);
}

function setConn(kind, text) {
  const c = $("conn");
  c.className = "conn conn-" + kind;
  c.textContent = text;
}

// ----------------------------------------------------------------------------- summary

function renderSummary(s) {
  ui.summary = s;
  ui.summaryAt = Date.now() / 1000;
  $("run-name").textContent = s.name;
  const badge = $("state-badge");
  badge.textContent = s.state;
  badge.className = "badge state-" + s.state;
  tickSummary();

  const err = $("error-box");
  if (s.error) {
    err.hidden = false;
    err.textContent = (s.state === "failed" ? "Failed" : "Error") + (s.stage ? ` in ${s.stage}` : "") + ": " + s.error;
  } else if (s.state === "stalled") {
    err.hidden = false;
    err.textContent = `Stalled: no heartbeat for ${fmtDuration(s.heartbeat_age_s)} (threshold ${fmtDuration(s.stall_after_s)}). ` +
      `The trainer (pid ${s.pid ?? "?"} on ${s.host ?? "?"}) may have died or hung.`;
  } else {
    err.hidden = true;
  }

  const pct = isNum(s.progress) ? s.progress * 100 : 0;
  const bar = $("progress-bar");
  bar.style.width = pct.toFixed(2) + "%";
  bar.className = "progress-bar" + ({ finished: " done", failed: " failed", stalled: " stalled" }[s.state] || "");

  $("kpi-step").textContent = s.step ?? "–";
  $("kpi-step-sub").textContent = s.total_steps ? `of ${s.total_steps} · ${pct.toFixed(1)}%` : "";
  $("kpi-epoch").textContent = typeof s.epoch === "number" && !Number.isInteger(s.epoch) ? s.epoch.toFixed(2) : (s.epoch ?? "–");
  $("kpi-epoch-sub").textContent = s.num_epochs ? `of ${s.num_epochs}` : "";
  $("kpi-eta").textContent = s.state === "running" ? fmtDuration(s.eta_s) : (s.state === "finished" ? "done" : "–");
  $("kpi-eta-sub").textContent = isNum(s.steps_per_s) ? `${s.steps_per_s.toFixed(2)} steps/s` : "";
  $("kpi-loss").textContent = fmtNum(s.loss);
  $("kpi-loss-sub").textContent = s.lr !== null && s.lr !== undefined ? `lr ${fmtExp(s.lr)}` : "";
  $("kpi-val").textContent = fmtNum(s.val_loss);
  $("kpi-val-sub").textContent = s.best_val_loss !== null && s.best_val_loss !== undefined ? `best ${fmtNum(s.best_val_loss)}` : "";
  $("kpi-bpb").textContent = fmtNum(s.val_bpb, 3);
  $("kpi-bpb-sub").textContent = s.val_step !== null && s.val_step !== undefined ? `at step ${s.val_step}` : "";
  $("kpi-tps").textContent = fmtCompact(s.tokens_per_s);
  $("kpi-tps-sub").textContent = s.tokens_seen ? `${fmtCompact(s.tokens_seen)} tokens seen` : "";
  $("kpi-mfu").textContent = isNum(s.mfu) ? (s.mfu * 100).toFixed(1) + "%" : fmtNum(s.mfu);
}

// Parts of the header that age by themselves (heartbeat) are redrawn every second.
function tickSummary() {
  const s = ui.summary;
  $("clock").textContent = new Date().toLocaleTimeString();
  if (!s) return;
  const age = s.heartbeat_age_s === null || s.heartbeat_age_s === undefined ? null : s.heartbeat_age_s + (Date.now() / 1000 - ui.summaryAt);
  const bits = [];
  if (s.preset) bits.push("preset " + s.preset);
  if (s.stage) bits.push("stage " + s.stage);
  if (s.host) bits.push(s.host);
  if (s.stop_reason) bits.push("stopped: " + s.stop_reason);
  if (age !== null) bits.push(`heartbeat ${fmtDuration(age)} ago`);
  if (s.partial_line) bits.push("last metrics line still being written");
  if (s.exact === false) bits.push("large run: showing a sample while indexing…");
  $("run-meta").textContent = bits.join(" · ");
  const p = isNum(s.progress) ? `${(s.progress * 100).toFixed(1)}% · ` : "";
  $("progress-text").textContent = `${p}step ${s.step ?? "–"}${s.total_steps ? " of " + s.total_steps : ""}` +
    (s.state === "running" && s.eta_s !== null && s.eta_s !== undefined ? ` · about ${fmtDuration(s.eta_s)} left` : "");
}

// ----------------------------------------------------------------------------- charts

function chartDefs() { return TRAIN_CHARTS.concat(SYSTEM_CHARTS); }

function buildCharts() {
  for (const c of Object.values(ui.charts)) Plotly.purge(c.plot);
  ui.charts = {};
  for (const [defs, holder] of [[TRAIN_CHARTS, "train-charts"], [SYSTEM_CHARTS, "system-charts"]]) {
    const box = $(holder);
    box.replaceChildren();
    for (const def of defs) {
      const card = el("div", "chart-card");
      card.id = "chart-" + def.id;
      card.append(el("h3", null, def.title));
      const plot = el("div", "chart");
      card.append(plot);
      box.append(card);
      ui.charts[def.id] = { def, card, plot, rev: 0, drawn: false };
      ui.dirty.add(def.id);
    }
  }
  flushCharts();
}

function tracesFor(def) {
  const out = [];
  for (const t of def.traces || []) if (ui.series[t.key]) out.push({ key: t.key, name: t.name, markers: t.markers });
  if (def.match) {
    const keys = Object.keys(ui.series).filter((k) => def.match.test(k)).sort();
    for (const k of keys) out.push({ key: k, name: (def.prefix || "") + k.match(def.match)[1], markers: def.markers });
  }
  return out;
}

function chartsForKey(key) {
  const ids = [];
  for (const def of chartDefs()) {
    if ((def.traces || []).some((t) => t.key === key) || (def.match && def.match.test(key))) ids.push(def.id);
  }
  return ids;
}

function drawChart(id) {
  const c = ui.charts[id];
  if (!c) return;
  const def = c.def;
  const traces = tracesFor(def);
  if (!traces.length) {
    // nothing recorded (e.g. no GPU): say so instead of an empty frame; hide GPU cards
    c.card.hidden = !!def.gpu;
    if (c.drawn) { Plotly.purge(c.plot); c.drawn = false; }
    c.plot.className = "chart-empty";
    c.plot.textContent = def.gpu ? "" : "no data yet";
    return;
  }
  c.card.hidden = false;
  if (!c.drawn) { c.plot.className = "chart"; c.plot.textContent = ""; }
  const data = traces.map((t, i) => {
    const s = ui.series[t.key];
    return {
      x: def.time ? s.x.map((v) => v * 1000) : s.x, y: s.y, name: plotlyText(t.name), type: "scatter",
      mode: t.markers && s.x.length < 400 ? "lines+markers" : "lines",
      line: { width: 1.6, color: COLORS[i % COLORS.length] }, marker: { size: 4 },
      hovertemplate: def.format ? `%{y:${def.format}}` : "%{y:.4g}",
    };
  });
  c.rev += 1;
  const layout = {
    datarevision: c.rev, uirevision: id, autosize: true, height: 230,
    margin: { l: 52, r: 12, t: 8, b: 32 },
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    font: { color: "#aab4c0", size: 11 },
    showlegend: data.length > 1, legend: { orientation: "h", y: 1.12, x: 0, font: { size: 10.5 } },
    hovermode: "x unified",
    xaxis: { type: def.time ? "date" : "linear", gridcolor: "#232b36", zeroline: false,
             title: def.time ? undefined : { text: "step", standoff: 4, font: { size: 10 } } },
    yaxis: { gridcolor: "#232b36", zeroline: false, tickformat: def.format === ".1%" ? ".0%" : def.format === ".2e" ? ".1e" : undefined,
             range: def.range, autorange: def.range ? false : true },
  };
  Plotly.react(c.plot, data, layout, { displaylogo: false, responsive: true,
    modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d", "toggleSpikelines"] });
  c.drawn = true;
}

function flushCharts() {
  if (typeof Plotly === "undefined") return;
  for (const id of ui.dirty) drawChart(id);
  ui.dirty.clear();
}

// min/max thinning of one series in place, keeping the newest point
function thin(s) {
  const n = s.x.length, buckets = Math.floor(MAX_POINTS / 4), w = Math.ceil(n / buckets);
  const x = [], y = [];
  for (let i = 0; i < n; i += w) {
    let lo = i, hi = i;
    for (let j = i; j < Math.min(n, i + w); j++) { if (s.y[j] < s.y[lo]) lo = j; if (s.y[j] > s.y[hi]) hi = j; }
    for (const j of lo <= hi ? [lo, hi] : [hi, lo]) { if (x.length && x[x.length - 1] === s.x[j] && y[y.length - 1] === s.y[j]) continue; x.push(s.x[j]); y.push(s.y[j]); }
  }
  if (x[x.length - 1] !== s.x[n - 1]) { x.push(s.x[n - 1]); y.push(s.y[n - 1]); }
  s.x = x; s.y = y;
}

function onPoints(points) {
  for (const [key, xy] of Object.entries(points)) {
    let s = ui.series[key];
    if (!s) s = ui.series[key] = { x: [], y: [] };
    for (let i = 0; i < xy[0].length; i++) { s.x.push(xy[0][i]); s.y.push(xy[1][i]); }
    if (s.x.length > MAX_POINTS) thin(s);
    for (const id of chartsForKey(key)) ui.dirty.add(id);
  }
}

// ----------------------------------------------------------------------------- log, events, samples

function renderLog(lines, replace) {
  const box = $("log");
  const follow = $("log-follow").checked;
  if (replace) box.replaceChildren();
  const frag = document.createDocumentFragment();
  for (const line of lines) {
    const lower = line.toLowerCase();
    const cls = /\b(error|failed|traceback|nan)\b/.test(lower) ? " err" : /\b(warn|warning|stalled|rollback)\b/.test(lower) ? " warn" : "";
    frag.append(el("div", "log-line" + cls, line));
  }
  box.append(frag);
  while (box.childElementCount > LOG_LINES) box.firstElementChild.remove();
  if (follow) box.scrollTop = box.scrollHeight;
}

function renderEvents(events, replace) {
  const list = $("events");
  if (replace) list.replaceChildren();
  for (const ev of events) {
    const li = el("li");
    li.append(el("span", "muted", fmtTime(ev.t)));
    const warn = ["nan_skip", "rollback", "early_stop", "stopped", "error"].includes(ev.event);
    li.append(el("span", "event-name" + (warn ? " warn" : ""), ev.event));
    li.append(el("span", null, (ev.step !== undefined && ev.step !== null ? `step ${ev.step}: ` : "") + (ev.message || "")));
    list.prepend(li);
  }
  while (list.childElementCount > MAX_EVENTS) list.lastElementChild.remove();
}

// A trace is a list of per-token entries: {token|text|t, p|prob|score|...} (or plain
// [token, score] pairs). Low scores are red, high ones green.
function traceTokens(trace) {
  if (!Array.isArray(trace) || !trace.length) return null;
  const toks = [];
  for (const e of trace) {
    let text, score, label = null;
    if (Array.isArray(e)) { text = e[0]; score = e[1]; }
    else if (e && typeof e === "object") {
      text = e.token ?? e.text ?? e.t ?? e.piece;
      for (const k of ["p", "prob", "score", "confidence", "policy", "value", "logprob"]) {
        if (typeof e[k] === "number") { score = e[k]; label = k; break; }
      }
    }
    if (typeof text !== "string") return null;
    toks.push({ text, score: typeof score === "number" ? score : null, label });
  }
  const vals = toks.map((t) => t.score).filter((v) => v !== null);
  if (!vals.length) return { toks, lo: 0, hi: 1, label: null };
  let lo = Math.min(...vals), hi = Math.max(...vals);
  if (lo >= 0 && hi <= 1) { lo = 0; hi = 1; }
  return { toks, lo, hi: hi > lo ? hi : lo + 1, label: toks.find((t) => t.label)?.label };
}

function renderSamples() {
  const box = $("samples");
  box.replaceChildren();
  let legend = "";
  for (const s of ui.samples.slice().reverse()) {
    const card = el("div", "sample");
    card.append(el("div", "sample-head", `step ${s.step ?? "?"} · epoch ${s.epoch ?? "?"} · ${fmtTime(s.t)}`));
    const body = el("div", "sample-text");
    if (s.prompt) body.append(el("span", "sample-prompt", s.prompt));
    const tr = traceTokens(s.trace);
    if (tr) {
      for (const t of tr.toks) {
        const span = el("span", "tok", t.text);
        if (t.score !== null) {
          const f = Math.max(0, Math.min(1, (t.score - tr.lo) / (tr.hi - tr.lo)));
          span.style.background = `hsla(${Math.round(f * 120)}, 70%, 45%, 0.35)`;
          span.title = `${tr.label || "score"} ${t.score.toFixed(3)}`;
        }
        body.append(span);
      }
      legend = `token colour: ${tr.label || "trace score"} (red low → green high)`;
    } else {
      const text = s.text || "";
      body.append(el("span", null, s.prompt && text.startsWith(s.prompt) ? text.slice(s.prompt.length) : text));
    }
    card.append(body);
    box.append(card);
  }
  if (!ui.samples.length) box.append(el("div", "muted small", "No samples yet: the trainer writes them at epoch ends (and every train.sample_every steps)."));
  $("samples-legend").textContent = legend;
}

function renderCheckpoints(cks) {
  const body = $("checkpoints");
  body.replaceChildren();
  for (const c of cks) {
    const tr = el("tr");
    tr.append(el("td", null, c.step), el("td", null, fmtNum(c.val_loss)), el("td", null, fmtBytes(c.size_bytes)));
    const tags = el("td");
    if (c.best) tags.append(el("span", "tag best", "best"));
    if (c.latest) tags.append(el("span", "tag latest", "latest"));
    if (!c.complete) tags.append(el("span", "tag", "writing…"));
    tr.append(tags);
    body.append(tr);
  }
  if (!cks.length) {
    const tr = el("tr");
    const td = el("td", "muted", "No checkpoints yet.");
    td.colSpan = 4;
    tr.append(td);
    body.append(tr);
  }
}

function renderLinks(links) {
  const ul = $("links");
  ul.replaceChildren();
  for (const l of links) {
    const li = el("li");
    const a = el("a", null, l.label);
    a.href = l.href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    li.append(a, el("span", "muted small", "  " + l.path));
    ul.append(li);
  }
  if (!links.length) ul.append(el("li", "muted", "No reports yet."));
}

// ----------------------------------------------------------------------------- comparison

async function renderCompare() {
  const names = Array.from(ui.compare);
  if (ui.selected && !names.includes(ui.selected)) names.unshift(ui.selected);
  const panel = $("compare-panel");
  panel.hidden = false;
  $("compare-names").textContent = names.join(", ");
  const q = new URLSearchParams({ runs: names.join(","), keys: "train/loss,eval/val_loss" });
  const resp = await fetch("/api/compare?" + q.toString(), { cache: "no-store" });
  if (!resp.ok) return;
  const data = (await resp.json()).runs;
  const traces = [];
  names.forEach((name, i) => {
    const s = data[name] || {};
    const color = COLORS[i % COLORS.length];
    if (s["train/loss"]) traces.push({ x: s["train/loss"][0], y: s["train/loss"][1], name: plotlyText(`${name} train`), type: "scatter", mode: "lines", line: { color, width: 1.4 } });
    if (s["eval/val_loss"]) traces.push({ x: s["eval/val_loss"][0], y: s["eval/val_loss"][1], name: plotlyText(`${name} val`), type: "scatter", mode: "lines+markers", line: { color, width: 2, dash: "dash" }, marker: { size: 5 } });
  });
  Plotly.react($("compare-chart"), traces, {
    height: 320, margin: { l: 52, r: 12, t: 8, b: 36 }, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    font: { color: "#aab4c0", size: 11 }, hovermode: "x unified", legend: { orientation: "h", y: 1.1 },
    xaxis: { gridcolor: "#232b36", title: { text: "step" } }, yaxis: { gridcolor: "#232b36", title: { text: "loss" } },
  }, { displaylogo: false, responsive: true });
  panel.scrollIntoView({ behavior: "smooth", block: "nearest" });
}

// ----------------------------------------------------------------------------- start

function start() {
  $("compare-btn").addEventListener("click", renderCompare);
  fetch("/api/runs", { cache: "no-store" }).then((r) => r.json()).then((d) => {
    $("runs-root").textContent = d.single ? "" : "from " + d.runs_root;
    onRuns(d.runs);
  }).catch(() => setConn("down", "server unreachable"));
  connectRuns();
  setInterval(flushCharts, 400);
  setInterval(tickSummary, 1000);
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
