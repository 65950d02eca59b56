// The killsafe dashboard: plain JavaScript, no dependencies, no build step.
// Data comes from the JSON API; live updates from /api/events, read with
// fetch() so the token can travel in a header (EventSource cannot send one).
"use strict";

const TOKEN_KEY = "killsafe-token";
const state = { status: null, history: [], checkpoints: [], saveRequests: new Set() };

// ---- token: from the URL fragment (never sent to the server), else asked for ----
(function takeTokenFromFragment() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

function askForToken() {
  const token = window.prompt("This server needs its access token (printed when it started):");
  if (token) sessionStorage.setItem(TOKEN_KEY, token.trim());
  return Boolean(token);
}

async function api(method, path, body) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = { Accept: "application/json", ...authHeaders() };
    const init = { method, headers };
    if (method !== "GET") {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body || {});
    }
    const response = await fetch(path, init);
    if (response.status === 401 && attempt === 0 && askForToken()) continue;
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = new Error(data.detail || response.status + " " + response.statusText);
      error.status = response.status;
      throw error;
    }
    return data;
  }
  throw new Error("not authorized");
}

// ---- formatting ----
const $ = (id) => document.getElementById(id);

function fmtNumber(value) {
  if (value === null || value === undefined || value === "") return "-";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(3);
  return value.toPrecision(4).replace(/\.?0+$/, "");
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
  return `${s}s`;
}

// The copy of killsafe.units.format_size: the same strings as the command line.
function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let i = 0;
  while (Math.abs(value) >= 1024 && i < units.length - 1) { value /= 1024; i++; }
  return (i ? oneDecimal(value) : String(Math.trunc(value))) + " " + units[i];
}

// Python's `:.1f` rounds a tie to even (907.25 -> 907.2); toFixed rounds it up.
function oneDecimal(value) {
  const tenths = value * 10;
  const floor = Math.floor(tenths);
  const rounded = tenths - floor === 0.5 ? floor + (floor % 2) : Math.round(tenths);
  return (rounded / 10).toFixed(1);
}

function fmtTime(epoch) {
  if (!epoch) return "-";
  const d = new Date(epoch * 1000);
  const sameDay = d.toDateString() === new Date().toDateString();
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return sameDay ? time : d.toLocaleDateString() + " " + time;
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// ---- toasts ----
function toast(text, kind) {
  const node = el("div", { className: "toast " + (kind || ""), textContent: text });
  node.setAttribute("role", kind === "error" ? "alert" : "status");
  $("toasts").append(node);
  setTimeout(() => node.remove(), kind === "error" ? 9000 : 5000);
}

// ---- status ----
function isLive() {
  const s = state.status;
  return Boolean(s && s.attached && s.control !== false);
}

function renderStatus(s) {
  state.status = s;
  $("directory").textContent = s.directory || "";
  const badge = $("state");
  if (s.attached) {
    badge.textContent = s.state === "stopping" ? "stopping" : "live";
    badge.className = "badge " + (s.state === "stopping" ? "stopping" : "live");
  } else {
    badge.textContent = s.state ? "not attached (" + s.state + ")" : "no live run";
    badge.className = "badge off";
  }
  $("save-button").disabled = !isLive();
  $("stop-button").disabled = !isLive() || s.state === "stopping";
  for (const button of document.querySelectorAll("button.delete")) button.disabled = isLive();

  const percent = typeof s.percent === "number" ? s.percent : null;
  $("progress-fill").style.width = (percent === null ? 0 : percent) + "%";
  $("progress-bar").setAttribute("aria-valuenow", percent === null ? 0 : percent.toFixed(1));
  $("percent").textContent = percent === null ? "-" : percent.toFixed(1) + " %";
  $("step").textContent = s.step === null || s.step === undefined ? "-"
    : fmtNumber(s.step) + (s.total_steps ? " / " + fmtNumber(s.total_steps) : "");
  $("rate").textContent = s.rate ? fmtNumber(s.rate) + " steps/s" : "-";
  $("elapsed").textContent = fmtDuration(s.elapsed);
  $("eta").textContent = s.attached ? fmtDuration(s.eta) : "-";
  $("phase").textContent = s.phase || "-";
  const last = s.last_checkpoint;
  $("last-checkpoint").textContent = last && last.step !== undefined ? "step " + fmtNumber(last.step) : "-";

  const metrics = $("metrics");
  metrics.replaceChildren();
  const best = s.best || {};
  for (const [name, value] of Object.entries(s.metrics || {})) {
    const b = best[name];
    const extra = b && b.value !== undefined ? ` (best ${fmtNumber(b.value)} @ ${fmtNumber(b.step)})` : "";
    metrics.append(el("div", {}, el("dt", { textContent: name }), el("dd", { textContent: fmtNumber(value) + extra })));
  }
  if (!metrics.children.length) metrics.append(el("p", { className: "muted", textContent: "No metrics yet." }));

  const r = s.resources || {};
  $("cpu").textContent = typeof r.cpu_percent === "number" ? r.cpu_percent.toFixed(0) + " %" : "-";
  $("rss").textContent = fmtBytes(r.rss_bytes);
  $("gpu").textContent = r.gpu_memory_bytes ? fmtBytes(r.gpu_memory_bytes) : "-";
  $("process").textContent = s.pid ? `pid ${s.pid}` + (s.host ? " on " + s.host : "") : "-";
}

// ---- plots: one small SVG line chart per numeric metric ----
const SVG = "http://www.w3.org/2000/svg";

function svgNode(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Round tick values (1, 2, 2.5 or 5 times a power of ten) inside [lo, hi], about `count` of them.
function ticks(lo, hi, count) {
  const raw = (hi - lo) / count;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].find((m) => m * power >= raw) * power;
  const first = Math.ceil(lo / step - 1e-9);
  const values = [];
  for (let i = first; i * step <= hi + step * 1e-9; i++) values.push(i * step);
  return { values, step };
}

// Tick labels with only the digits the step needs, in one notation per axis:
// "0.5 1.0 1.5", "5e-4 1e-3", "1e8 2e8 3e8".
function fmtTicks(values, step) {
  const power = Math.floor(Math.log10(step));
  const stepDigits = step / Math.pow(10, power) === 2.5 ? 1 : 0;  // 2.5 needs one more digit
  const largest = Math.max(...values.map(Math.abs));
  const exponent = largest < 1e-2 || largest >= 1e6;
  return values.map((value) => {
    if (Math.abs(value) < step * 1e-6) return "0";
    if (!exponent) return value.toFixed(Math.min(10, Math.max(0, stepDigits - power)));
    const magnitude = Math.floor(Math.log10(Math.abs(value)));
    const digits = Math.min(3, Math.max(0, magnitude - power + stepDigits));
    return value.toExponential(digits).replace(/\.?0+e/, "e").replace("e+", "e");
  });
}

const CHAR_WIDTH = 7.2;  // 12px tabular digits, in the chart's own units

function plotSeries(name, points) {
  const width = 480, height = 200, right = 12, top = 10, bottom = 24;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
  const yTicks = ticks(y0, y1, 4);  // 2 to 4 ticks
  const yLabels = fmtTicks(yTicks.values, yTicks.step);
  // The plot starts right of its widest label, so no label is cut at the edge.
  const left = Math.max(36, Math.ceil(Math.max(...yLabels.map((t) => t.length)) * CHAR_WIDTH) + 12);
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  const svg = svgNode("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
                               "aria-label": name + " by step" });
  yTicks.values.forEach((y, i) => {
    svg.append(svgNode("line", { x1: left, x2: width - right, y1: sy(y), y2: sy(y), class: "grid" }));
    svg.append(svgNode("text", { x: left - 6, y: sy(y) + 3, "text-anchor": "end" }, yLabels[i]));
  });
  svg.append(svgNode("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis" }));
  svg.append(svgNode("text", { x: left, y: height - 6 }, fmtNumber(x0)));
  svg.append(svgNode("text", { x: width - right, y: height - 6, "text-anchor": "end" }, fmtNumber(x1)));
  const d = points.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join("");
  svg.append(svgNode("path", { d, class: "series", "vector-effect": "non-scaling-stroke" }));
  return el("figure", { className: "plot" }, el("figcaption", { textContent: name }), svg);
}

function downsample(points, limit) {
  if (points.length <= limit) return points;
  const stride = points.length / limit;
  const out = [];
  for (let i = 0; i < limit; i++) out.push(points[Math.floor(i * stride)]);
  out.push(points[points.length - 1]);
  return out;
}

function renderHistory(records) {
  state.history = records;
  const series = new Map();
  for (const record of records) {
    for (const [key, value] of Object.entries(record)) {
      if (key === "step" || key === "time" || typeof value !== "number" || !isFinite(value)) continue;
      if (!series.has(key)) series.set(key, []);
      series.get(key).push([record.step, value]);
    }
  }
  const plots = $("plots");
  plots.replaceChildren();
  for (const [name, points] of series) plots.append(plotSeries(name, downsample(points, 600)));
  if (!series.size) plots.append(el("p", { className: "muted", textContent: "No metrics logged yet." }));
}

// ---- checkpoints ----
function renderCheckpoints(checkpoints) {
  state.checkpoints = checkpoints;
  const body = $("checkpoints").tBodies[0];
  body.replaceChildren();
  for (const c of checkpoints.slice().reverse()) {
    const nameCell = el("td", {}, c.name || el("span", { className: "muted", textContent: c.id }));
    if (c.latest) nameCell.append(el("span", { className: "tag", textContent: "latest" }));
    if (c.best) nameCell.append(el("span", { className: "tag", textContent: "best" }));
    if (c.note) nameCell.append(el("span", { className: "note", textContent: c.note }));
    const metrics = Object.entries(c.metrics || {}).map(([k, v]) => k + "=" + fmtNumber(v)).join("  ");
    const remove = el("button", { className: "small danger delete", textContent: "Delete",
      title: isLive() ? "A live run owns its checkpoints; delete once it has ended" : "Delete " + c.id });
    remove.disabled = isLive();
    remove.addEventListener("click", () => deleteCheckpoint(c));
    const row = el("tr", {},
      el("td", { className: "num", textContent: fmtNumber(c.step) }),
      nameCell,
      el("td", { textContent: c.reason || "-" }),
      el("td", { className: "metrics", textContent: metrics || "-" }),
      el("td", { className: "num", textContent: fmtBytes(c.size) }),
      el("td", { textContent: fmtTime(c.created) }),
      el("td", { className: "num" }, remove));
    row.dataset.id = c.id;
    body.append(row);
  }
  if (!checkpoints.length) {
    body.append(el("tr", { className: "empty" }, el("td", { colSpan: 7, className: "muted", textContent: "No checkpoints yet." })));
  }
}

// ---- dialogs ----
function openDialog(dialog) {
  return new Promise((resolve) => {
    const cancel = dialog.querySelector(".cancel");
    const onCancel = () => dialog.close("cancel");
    cancel.addEventListener("click", onCancel, { once: true });
    dialog.addEventListener("close", () => {
      cancel.removeEventListener("click", onCancel);
      resolve(dialog.returnValue);
    }, { once: true });
    dialog.returnValue = "cancel";
    dialog.showModal();
  });
}

function confirmAction(title, text, okLabel) {
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  return openDialog($("confirm-dialog")).then((value) => value === "ok");
}

async function saveCheckpoint() {
  const step = state.status && state.status.step !== undefined && state.status.step !== null ? state.status.step : 0;
  $("save-name").value = "step-" + step;
  $("save-note").value = "";
  setTimeout(() => $("save-name").select(), 0);
  if ((await openDialog($("save-dialog"))) !== "save") return;
  const name = $("save-name").value.trim();
  const note = $("save-note").value.trim();
  try {
    const answer = await api("POST", "/api/checkpoints", { name: name || null, note: note || null });
    state.saveRequests.add(answer.request_id);
    const saved = answer.name || "an unnamed checkpoint";
    toast(answer.coalesced ? `A save is already pending (${saved}); it will be taken at the next step.`
                           : `Save requested: ${saved}`, "info");
  } catch (error) {
    toast("Save not requested: " + error.message, "error");
  }
}

async function stopRun() {
  const ok = await confirmAction("Stop the run?",
    "The run finishes its current step, saves an emergency checkpoint and exits. Starting it again resumes from there.",
    "Stop");
  if (!ok) return;
  try {
    await api("POST", "/api/stop", {});
    toast("Stop requested; the run saves and exits at its next step.", "info");
  } catch (error) {
    toast("Stop not requested: " + error.message, "error");
  }
}

async function deleteCheckpoint(c) {
  const role = c.latest ? " It is the latest checkpoint." : c.best ? " It is the best checkpoint." : "";
  const ok = await confirmAction("Delete checkpoint?",
    `Delete ${c.name || c.id} (step ${fmtNumber(c.step)}) from disk?${role} This cannot be undone.`, "Delete");
  if (!ok) return;
  try {
    const force = c.latest || c.best ? "?force=true" : "";
    await api("DELETE", "/api/checkpoints/" + encodeURIComponent(c.id) + force, {});
    toast("Deleted " + (c.name || c.id), "ok");
  } catch (error) {
    toast("Not deleted: " + error.message, "error");
  }
  refreshCheckpoints();
}

// ---- live events ----
function handleEvent(kind, data) {
  if (kind === "progress") {
    renderStatus(data);
    if (Date.now() - lastHistory > 1500) refreshHistory();
    return;
  }
  if (kind === "saved") {
    toast(`Saved checkpoint ${data.name || ""} at step ${fmtNumber(data.step)}`.replace("  ", " "), "ok");
    refreshCheckpoints();
  } else if (kind === "save-failed") {
    toast("Save failed: " + (data.error || data.message || "see the run's log"), "error");
  } else if (kind === "stopped") {
    toast(`The run stopped at step ${fmtNumber(data.step)}` + (data.reason ? ` (${data.reason})` : "") + ".", "info");
    refreshCheckpoints();
  } else if (kind === "finished") {
    toast(`The run finished at step ${fmtNumber(data.step)}.`, "ok");
    refreshCheckpoints();
  } else if (kind === "failed") {
    toast("The run failed" + (data.error ? ": " + data.error : "") + ".", "error");
  }
  refreshStatus();
}

async function followEvents() {
  for (;;) {
    try {
      const response = await fetch("/api/events", { headers: { Accept: "text/event-stream", ...authHeaders() } });
      if (response.ok && response.body) {
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let kind = "message", data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) kind = line.slice(6).trim();
              else if (line.startsWith("data:")) data += line.slice(5).trim();
            }
            if (data) {
              try { handleEvent(kind, JSON.parse(data)); } catch (e) { /* a malformed event is skipped */ }
            }
          }
        }
      }
    } catch (error) { /* the server went away: retry below */ }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// ---- polling (covers a run that dies without a last word) ----
async function refreshStatus() {
  try { renderStatus(await api("GET", "/api/status")); } catch (e) { offline(); }
}
async function refreshCheckpoints() {
  try { renderCheckpoints((await api("GET", "/api/checkpoints")).checkpoints); } catch (e) { /* next time */ }
}
// The history is fetched whole once, then only the records logged since (the
// cursor of the last answer): the server reads a few new lines, not the file.
let lastHistory = 0, historyCursor = null, historyBusy = false;
async function refreshHistory() {
  if (historyBusy) return;
  historyBusy = true;
  lastHistory = Date.now();
  try {
    const query = historyCursor ? "?cursor=" + encodeURIComponent(historyCursor) : "";
    const answer = await api("GET", "/api/history" + query);
    const records = answer.reset ? answer.records : state.history.concat(answer.records);
    historyCursor = answer.cursor;
    if (answer.reset || answer.records.length) renderHistory(records);
  } catch (e) { /* next time */ } finally { historyBusy = false; }
}
function offline() {
  $("state").textContent = "server unreachable";
  $("state").className = "badge off";
  $("save-button").disabled = true;
  $("stop-button").disabled = true;
}

$("save-button").addEventListener("click", saveCheckpoint);
$("stop-button").addEventListener("click", stopRun);
refreshStatus().then(() => { refreshCheckpoints(); refreshHistory(); followEvents(); });
setInterval(refreshStatus, 2000);
setInterval(refreshCheckpoints, 10000);
setInterval(refreshHistory, 5000);
