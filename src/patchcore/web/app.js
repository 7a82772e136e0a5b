// The page of `patchcore serve`: pick a model, send an image, look at the verdict and the map.
// Plain browser JavaScript, no build step and nothing from the internet. The server scores once; the
// threshold slider only redraws the defect outline from the map the server sent (see MapView in the API
// reference), so looking at other thresholds never changes the model or scores again.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "patchcore-api-key";
const state = { key: sessionStorage.getItem(KEY_STORE) || "", models: [], file: null, result: null,
                overlay: null, values: null, lo: 0, hi: 1, atModel: true };

function headers() { return state.key ? { "X-API-Key": state.key } : {}; }
function setState(s) { document.body.dataset.state = s; }
function fmt(x) { return Number(x).toPrecision(4); }
function pct(x) { return (100 * x).toFixed(x < 0.001 && x > 0 ? 3 : 1) + "%"; }

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function detail(resp) {
  try {
    const body = await resp.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) {
    return `${resp.status} ${resp.statusText}`;
  }
}

function fail(message) {
  $("busy").hidden = true;
  showError(message);
  setState("error");
}

// ---------------------------------------------------------------------------------------------- models
async function loadModels() {
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    fail(`the server did not answer (${e.message})`);
    return;
  }
  if (resp.status === 401) {
    $("key-row").hidden = false;
    fail(await detail(resp));
    return;
  }
  if (!resp.ok) {
    fail(await detail(resp));
    return;
  }
  const body = await resp.json();
  state.models = body.models;
  const select = $("model");
  const before = select.value;
  select.replaceChildren();
  for (const m of body.models) select.add(new Option(m.kind === "export" ? `${m.name} (export)` : m.name, m.name));
  if (!body.models.length) select.add(new Option("no model serves yet", ""));
  if (body.models.some((m) => m.name === before)) select.value = before;
  describeModel(body.failures);
  if (state.key) $("key-row").hidden = true;
  showError("");
  setState("ready");
}

function describeModel(failures) {
  const m = state.models.find((x) => x.name === $("model").value);
  let text = m ? `${m.backbone}, ${m.image_size.join(" x ")} px; threshold ${fmt(m.threshold)} (${m.threshold_source}).` : "";
  if (m && m.calibration.statement) text += " " + m.calibration.statement;
  if (m && m.version) text += ` Version ${m.version}.`;
  if (failures && failures.length) {
    text += ` Not loaded: ${failures.map((f) => `${f.file} (${f.detail})`).join("; ")}.`;
  }
  $("model-info").textContent = text;
  // The recent stream against the calibration: the same line as /v1/models' drift.in_words.
  const drift = $("drift");
  drift.textContent = m && m.drift ? `Recent images: ${m.drift.in_words}` : "";
  drift.dataset.drifting = String(Boolean(m && m.drift && m.drift.drifting));
}

// ---------------------------------------------------------------------------------------------- feedback
async function sendFeedback(label) {
  const r = state.result;
  if (!r) return;
  let resp;
  try {
    resp = await fetch(`/v1/models/${encodeURIComponent(r.model)}:feedback`, {
      method: "POST", headers: { ...headers(), "Content-Type": "application/json" },
      body: JSON.stringify({ id: r.id, label }),
    });
  } catch (e) {
    $("feedback-done").textContent = `the server did not answer (${e.message})`;
    return;
  }
  if (!resp.ok) {
    $("feedback-done").textContent = await detail(resp);
    return;
  }
  const body = await resp.json();
  $("feedback-done").textContent = (body.overrules ? "Recorded: the model's verdict overruled. " : "Recorded. ") +
    `Held for ${r.model}: ${body.held.good} good, ${body.held.defect} defective.`;
}

// ---------------------------------------------------------------------------------------------- scoring
async function send(file) {
  const name = $("model").value;
  state.file = file;
  $("file-name").textContent = file.name;
  if (!name) {
    fail("no model serves yet: add a model file to the server's folder");
    return;
  }
  showError("");
  setState("loading");
  $("busy").hidden = false;
  const form = new FormData();
  form.append("image", file, file.name);
  let resp;
  try {
    resp = await fetch(`/v1/models/${encodeURIComponent(name)}:predict?overlay=true&outline=false&map=true`,
                       { method: "POST", body: form, headers: headers() });
  } catch (e) {
    fail(`the server did not answer (${e.message})`);
    return;
  }
  if (!resp.ok) {
    if (resp.status === 401) $("key-row").hidden = false;
    fail(await detail(resp));
    return;
  }
  const result = await resp.json();
  try {
    await show(result, file);
  } catch (e) {
    fail(`could not show the result (${e.message})`);
  }
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("image did not decode"));
    img.src = src;
  });
}

function pixels(img) {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, c.width, c.height);
}

async function show(r, file) {
  const [heat, map] = await Promise.all([loadImage("data:image/png;base64," + r.overlay_png),
                                         loadImage("data:image/png;base64," + r.map.png)]);
  state.result = r;
  state.overlay = pixels(heat);
  const grey = pixels(map).data;
  state.values = new Float32Array(r.width * r.height);
  for (let i = 0; i < state.values.length; i++) state.values[i] = (grey[4 * i] / 255) * r.map.scale;
  $("original").src = URL.createObjectURL(file);

  const v = $("verdict");
  v.textContent = r.verdict === "anomalous" ? "ANOMALOUS" : "GOOD";
  v.className = "verdict " + r.verdict;
  $("score-line").textContent = `score ${fmt(r.score)} against threshold ${fmt(r.threshold)}: ` +
    `${fmt(r.normalized_score)} x the threshold; defect area ${pct(r.defect_area_fraction)}`;
  $("source").textContent = `threshold ${r.threshold_source}; scored in ${(1000 * r.seconds).toFixed(0)} ms`;
  state.lo = 0.25 * r.threshold;
  state.hi = Math.max(2 * r.threshold, 1.25 * r.score);
  $("threshold").value = String(toSlider(r.threshold));
  state.atModel = true;
  $("feedback-done").textContent = "";
  $("busy").hidden = true;
  $("result").hidden = false;
  render();
  setState("done");
  refreshModels();
}

// After a prediction: the listing again, for the model's drift line (errors here change nothing).
async function refreshModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (resp.ok) {
      const body = await resp.json();
      state.models = body.models;
      describeModel(body.failures);
    }
  } catch (e) { /* the next prediction tries again */ }
}

// ---------------------------------------------------------------------------------- the threshold view
function toSlider(t) { return Math.round(1000 * (t - state.lo) / (state.hi - state.lo)); }
function fromSlider() {
  if (state.atModel) return state.result.threshold;  // exactly, not the slider's nearest step
  return state.lo + (Number($("threshold").value) / 1000) * (state.hi - state.lo);
}

// The rule of Prediction.defect_mask: nothing for a good verdict; for an anomalous one, every pixel at or
// above the pixel threshold (scaled with t) and always the region around the map's peak.
function maskLevel(r, t) {
  return r.score >= t ? Math.min(t * r.map.pixel_ratio, r.map.peak_level) : Infinity;
}

function render() {
  const r = state.result;
  if (!r) return;
  const t = fromSlider();
  const level = maskLevel(r, t);
  const w = r.width, h = r.height, values = state.values;
  let mask = new Uint8Array(w * h);
  let area = 0;
  for (let i = 0; i < mask.length; i++) if (values[i] >= level) { mask[i] = 1; area++; }
  // The outline: mask pixels that an erosion of the overlay's width removes (as the server draws it).
  const width = Math.max(1, Math.round(Math.min(w, h) / 256));
  let inner = mask;
  for (let k = 0; k < width; k++) {
    const next = new Uint8Array(w * h);
    for (let y = 1; y < h - 1; y++) {
      for (let x = 1; x < w - 1; x++) {
        const i = y * w + x;
        next[i] = inner[i] && inner[i - 1] && inner[i + 1] && inner[i - w] && inner[i + w] ? 1 : 0;
      }
    }
    inner = next;
  }
  const canvas = $("view");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const out = new ImageData(new Uint8ClampedArray(state.overlay.data), w, h);
  for (let i = 0; i < mask.length; i++) {
    if (mask[i] && !inner[i]) {
      out.data[4 * i] = out.data[4 * i + 1] = out.data[4 * i + 2] = 255;
    }
  }
  ctx.putImageData(out, 0, 0);
  canvas.dataset.outlined = String(area);

  const verdict = r.score >= t ? "anomalous" : "good";
  const same = state.atModel;
  $("threshold-value").textContent = `${fmt(t)} (${fmt(t / r.threshold)} x the model's)`;
  $("at-view").textContent = `${same ? "At the model's threshold" : "At this threshold"} the image is ${verdict}; ` +
    `the outlined defect covers ${pct(area / mask.length)} of it.`;
  $("at-view").dataset.verdict = verdict;
  const top = Math.max(state.hi, r.score) * 1.05;
  $("bar-score").style.width = `${Math.min(100, (100 * r.score) / top)}%`;
  $("bar-score").style.background = r.verdict === "anomalous" ? "var(--bad)" : "var(--good)";
  $("bar-threshold").style.left = `${(100 * r.threshold) / top}%`;
  $("bar-view").style.left = `${(100 * t) / top}%`;
}

// ------------------------------------------------------------------------------------------------ wiring
$("file").addEventListener("change", (e) => { if (e.target.files.length) send(e.target.files[0]); });
$("model").addEventListener("change", () => {
  describeModel();
  if (state.file) send(state.file);
});
$("threshold").addEventListener("input", () => { state.atModel = false; render(); });
$("reset").addEventListener("click", () => {
  if (!state.result) return;
  $("threshold").value = String(toSlider(state.result.threshold));
  state.atModel = true;
  render();
});
$("feedback-good").addEventListener("click", () => sendFeedback("good"));
$("feedback-defect").addEventListener("click", () => sendFeedback("defect"));
$("key-use").addEventListener("click", () => {
  state.key = $("key").value.trim();
  sessionStorage.setItem(KEY_STORE, state.key);
  loadModels();
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
loadModels();
