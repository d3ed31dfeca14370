// The live page: polls v1/live (the JSON the tests read too) and draws it with Chart.js; classifies dropped images
// through POST /predict; resets through POST /reset with the admin token it asks for. Paths are relative, so the
// page works behind a proxy prefix as well.
"use strict";

const API_KEY = "tta-api-key"; // sessionStorage: asked once on a 401 from /predict, forgotten with the tab
const COLORS = { blue: "#1f6fb4", grey: "#8a8a8a", red: "#c8372d", green: "#2c8a3c", orange: "#d9822b" };

// chart name -> its lines: [label, series name, colour, y axis, scale]; the source line is dashed, since the two
// accuracies often coincide
const CHARTS = {
  latency: [["p50", "latency_p50_s", COLORS.blue, "y", 1000], ["p99", "latency_p99_s", COLORS.red, "y", 1000]],
  batching: [["batch size", "batch_size_mean", COLORS.blue, "y", 1], ["queue", "queue_depth", COLORS.orange, "y1", 1]],
  accuracy: [
    ["adapted", "accuracy_adapted", COLORS.blue, "y", 100],
    ["source", "accuracy_source", COLORS.grey, "y", 100],
  ],
  entropy: [["entropy EMA", "entropy_ema", COLORS.green, "y", 1], ["drift", "param_drift", COLORS.orange, "y1", 1]],
  steps: [["steps", "steps_total", COLORS.blue, "y", 1], ["resets", "resets_total", COLORS.red, "y1", 1]],
};
const PERCENT_AXIS = { accuracy: { min: 0, max: 100, title: { display: true, text: "%" } } };

const charts = new Map(); // canvas -> Chart

function makeChart(canvas) {
  const name = canvas.dataset.chart;
  const lines = CHARTS[name];
  const rightAxis = lines.some((line) => line[3] === "y1");
  const scales = {
    x: { type: "linear", max: 0, title: { display: true, text: "seconds ago" } },
    y: { beginAtZero: true, ...(PERCENT_AXIS[name] || {}) },
  };
  if (rightAxis) scales.y1 = { position: "right", beginAtZero: true, grid: { drawOnChartArea: false } };
  const datasets = lines.map(([label, key, color, axis]) => ({
    label, data: [], borderColor: color, backgroundColor: color, yAxisID: axis, pointRadius: 0, borderWidth: 1.5,
    borderDash: key === "accuracy_source" ? [5, 4] : [],
  }));
  const chart = new Chart(canvas, {
    type: "line",
    data: { datasets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, parsing: false, scales,
      plugins: { legend: { labels: { boxWidth: 12 } } },
    },
  });
  charts.set(canvas, chart);
  return chart;
}

function draw(root, series) {
  const t = series.t;
  const newest = t.length ? t[t.length - 1] : 0;
  for (const canvas of root.querySelectorAll("canvas[data-chart]")) {
    const chart = charts.get(canvas) || makeChart(canvas);
    CHARTS[canvas.dataset.chart].forEach(([, key, , , scale], i) => {
      chart.data.datasets[i].data = t.map((ti, j) => ({
        x: Math.round((ti - newest) * 10) / 10,
        y: series[key][j] === null ? null : series[key][j] * scale,
      }));
    });
    chart.update("none");
  }
}

function setNow(root, name, text) {
  root.querySelector(`[data-now="${name}"]`).textContent = text;
}

function last(values) {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i];
  return null;
}

const percent = (value) => (value === null ? "–" : `${(100 * value).toFixed(1)}%`);
const byReason = (counts) => Object.entries(counts).filter(([, v]) => v > 0).map(([k, v]) => `${k} ${v}`).join(", ") || "none";

function streamPanel(name) {
  const container = document.getElementById("streams");
  let panel = [...container.children].find((child) => child.dataset.stream === name);
  if (!panel) {
    panel = document.getElementById("stream-panel").content.firstElementChild.cloneNode(true);
    panel.dataset.stream = name;
    panel.querySelector(".stream-name").textContent = name;
    panel.querySelector(".reset-stream").addEventListener("click", () => reset(name));
    container.append(panel);
  }
  return panel;
}

function renderStream(name, figures, shadow) {
  const panel = streamPanel(name);
  const { now, series } = figures;
  setNow(panel, "labels", Object.entries(now.labels).map(([k, v]) => `${k} ${v}`).join(", "));
  setNow(panel, "accuracy_adapted", percent(last(series.accuracy_adapted)));
  setNow(panel, "accuracy_source", shadow ? percent(last(series.accuracy_source)) : "off (TTA_SHADOW_SOURCE)");
  setNow(panel, "steps", `${now.steps_total} (${now.steps_since_reset})`);
  setNow(panel, "resets", byReason(now.resets));
  setNow(panel, "skipped", byReason(now.skipped));
  draw(panel, series);
}

function render(live) {
  const server = document.getElementById("server");
  setNow(server, "queue_depth", `${live.server.now.queue_depth} / ${live.server.now.max_queue_images}`);
  const rate = last(live.server.series.images_per_s);
  setNow(server, "images_per_s", rate === null ? "–" : rate.toFixed(1));
  setNow(server, "predictions_total", String(live.server.now.predictions_total));
  draw(server, live.server.series);
  const names = Object.keys(live.streams).sort((a, b) => (a === "default" ? -1 : b === "default" ? 1 : a < b ? -1 : 1));
  for (const name of names) renderStream(name, live.streams[name], live.shadow_source);
  for (const panel of [...document.getElementById("streams").children]) {
    if (!(panel.dataset.stream in live.streams)) panel.remove();
  }
}

function say(text, isError = false) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = isError ? "error" : "";
}

async function poll() {
  let interval = 1000;
  try {
    const response = await fetch("v1/live", { cache: "no-store" });
    if (!response.ok) throw new Error(`GET v1/live answered ${response.status}`);
    const live = await response.json();
    interval = live.interval_s * 1000;
    render(live);
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (error) {
    say(`live figures unavailable: ${error.message}`, true);
  }
  setTimeout(poll, interval);
}

async function describe() {
  const response = await fetch("v1/status");
  if (!response.ok) return;
  const status = await response.json();
  const model = status.model.architecture || status.model.path;
  document.getElementById("summary").textContent = `method ${status.method} · ${model} · ${status.device}`;
}

async function errorText(response) {
  const body = await response.json().catch(() => ({}));
  return body.detail ? `${body.error}: ${body.detail}` : `HTTP ${response.status}`;
}

async function predict(form) {
  const key = sessionStorage.getItem(API_KEY);
  return fetch("predict", { method: "POST", body: form, headers: key ? { "X-API-Key": key } : {} });
}

async function classify(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  let response = await predict(form);
  if (response.status === 401) {
    const key = prompt("This server needs an API key for /predict (TTA_API_KEYS):");
    if (!key) return;
    sessionStorage.setItem(API_KEY, key);
    response = await predict(form);
  }
  if (!response.ok) return say(`classification refused: ${await errorText(response)}`, true);
  const answer = await response.json();
  const results = document.getElementById("results");
  results.replaceChildren(...answer.predictions.map((prediction, i) => resultCard(files[i], prediction)));
  say(`classified ${files.length} image(s); adaptation step ${answer.adaptation_step}`);
}

function element(tag, attributes = {}, ...children) {
  const node = Object.assign(document.createElement(tag), attributes);
  node.append(...children);
  return node;
}

function resultCard(file, prediction) {
  const rows = prediction.top_k.map((k) => element("tr", {},
    element("td", {}, k.class_name),
    element("td", { className: "bar" }, element("span", { style: `width: ${100 * k.confidence}%` })),
    element("td", {}, percent(k.confidence))));
  return element("figure", { className: "result" },
    element("img", { src: URL.createObjectURL(file), alt: file.name }),
    element("figcaption", {}, element("strong", {}, prediction.class_name), ` ${percent(prediction.confidence)}`,
      element("br"), element("small", {}, `${file.name} · entropy ${prediction.entropy.toFixed(3)} · id ${prediction.id}`)),
    element("table", { className: "top-k" }, ...rows));
}

// Every stream, or one (POST /reset?stream=S). The token is asked each time and never kept.
async function reset(stream) {
  const token = prompt("Admin token (TTA_ADMIN_TOKEN); leave empty if the server has none:");
  if (token === null) return;
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const query = stream ? `?stream=${encodeURIComponent(stream)}` : "";
  const response = await fetch(`reset${query}`, { method: "POST", headers });
  if (!response.ok) return say(`reset refused: ${await errorText(response)}`, true);
  say(stream ? `stream ${stream} reset to the source model` : "adaptation reset to the source model");
}

function wireDropZone() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  input.addEventListener("change", () => classify([...input.files]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    classify([...event.dataTransfer.files]);
  });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") input.click(); });
}

document.getElementById("reset").addEventListener("click", () => reset());
wireDropZone();
describe();
poll();
