// The conchdb search page: plain JavaScript over the /v1 API, no build step.
// Every request carries the API key (asked once, kept in sessionStorage); images are fetched
// with it and shown from blob URLs, since <img> cannot send headers.
"use strict";

const KEY_STORE = "conchdb-api-key";
// Fields every tile has that are bookkeeping rather than something to filter a search by.
const HIDDEN_FIELDS = new Set(["path", "ingest_run", "tiling", "mpp_source", "x", "y", "size", "target_mpp", "tile_px", "slide_id"]);
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  query: null,      // {kind: "text", text, ensemble} | {kind: "image", file} | {kind: "point", pointId}
  page: 1,
  topK: 24,
  schema: [],
  hits: [],
  viewer: null,
  viewerHit: null,
  heatmapItem: null,
  tilesLoaded: 0,
};
window.conchdb = state; // for the browser tests and for curious users

function headers(extra = {}) {
  return state.key ? { "X-API-Key": state.key, ...extra } : extra;
}

function showError(message, fix) {
  const banner = $("banner");
  banner.replaceChildren();
  const text = document.createElement("span");
  text.textContent = message;
  banner.append(text);
  if (fix) {
    const hint = document.createElement("span");
    hint.className = "fix";
    hint.textContent = "Fix: " + fix;
    banner.append(hint);
  }
  banner.hidden = false;
}

function clearError() { $("banner").hidden = true; }

function askKey() {
  const given = window.prompt("This server needs an API key. It is kept for this browser session only.", state.key);
  if (given === null) return false;
  state.key = given.trim();
  sessionStorage.setItem(KEY_STORE, state.key);
  updateKeyButton();
  return true;
}

function updateKeyButton() { $("key-button").textContent = state.key ? "API key ✓" : "API key"; }

// fetch() on the API; a refusal becomes a banner with the server's message and fix.
async function api(path, options = {}, retried = false) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.ok) return response;
  let body = { error: `the server answered ${response.status}`, fix: null };
  try { body = await response.json(); } catch (_) { /* not JSON: keep the status */ }
  if (response.status === 401 && !retried && askKey()) return api(path, options, true);
  showError(`The server refused (${response.status}): ${body.error}`, body.fix);
  const error = new Error(body.error);
  error.status = response.status;
  throw error;
}

async function blobUrl(path) {
  const response = await api(path);
  return URL.createObjectURL(await response.blob());
}

// -- health and filters ----------------------------------------------------------------------

async function loadHealth() {
  try {
    const health = await (await fetch("/v1/health")).json();
    $("health").textContent = health.status === "ok"
      ? `${health.points} tiles in ${health.collection} · model ready`
      : `not ready: store ${health.store ? "ok" : "missing"}, model ${health.model ? "ok" : "missing"}`;
  } catch (_) {
    $("health").textContent = "the server cannot be reached";
  }
}

async function loadSchema() {
  const schema = await (await api("/v1/schema")).json();
  state.schema = schema.fields.filter((f) => !HIDDEN_FIELDS.has(f.name));
  const form = $("filters");
  form.replaceChildren();
  for (const field of state.schema) {
    const label = document.createElement("label");
    const name = document.createElement("span");
    name.textContent = field.name;
    label.append(name);
    if (field.type === "bool") {
      const select = document.createElement("select");
      select.name = field.name;
      for (const [value, text] of [["", "any"], ["true", "yes"], ["false", "no"]]) select.add(new Option(text, value));
      label.append(select);
    } else if (field.type === "integer" || field.type === "float") {
      const range = document.createElement("span");
      range.className = "range";
      for (const end of ["min", "max"]) {
        const input = document.createElement("input");
        input.type = "number"; input.step = "any"; input.placeholder = end; input.name = `${field.name}.${end}`;
        range.append(input);
      }
      label.append(range);
    } else {
      const input = document.createElement("input");
      input.name = field.name; input.placeholder = "any";
      label.append(input);
    }
    form.append(label);
  }
  form.addEventListener("change", () => { if (state.query) runSearch(1); });
}

function readFilters() {
  const out = {};
  for (const field of state.schema) {
    const form = $("filters");
    if (field.type === "bool") {
      const value = form.elements[field.name].value;
      if (value) out[field.name] = value === "true";
    } else if (field.type === "integer" || field.type === "float") {
      const rule = {};
      const min = form.elements[`${field.name}.min`].value, max = form.elements[`${field.name}.max`].value;
      if (min !== "") rule.gte = Number(min);
      if (max !== "") rule.lte = Number(max);
      if (Object.keys(rule).length) out[field.name] = rule;
    } else {
      const values = form.elements[field.name].value.split(",").map((v) => v.trim()).filter(Boolean);
      if (values.length === 1) out[field.name] = values[0];
      else if (values.length > 1) out[field.name] = { in: values };
    }
  }
  return out;
}

// -- searching -------------------------------------------------------------------------------

async function runSearch(page) {
  if (!state.query) return;
  clearError();
  state.page = page;
  state.topK = Number($("top-k").value);
  const options = { top_k: state.topK, page, filters: readFilters() };
  let response;
  try {
    if (state.query.kind === "text") {
      response = await api("/v1/search/text", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ query: state.query.text, ensemble: state.query.ensemble, ...options }),
      });
    } else if (state.query.kind === "point") {
      response = await api("/v1/search/image", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ point_id: state.query.pointId, ...options }),
      });
    } else {
      const form = new FormData();
      form.append("image", state.query.file);
      form.append("top_k", String(options.top_k));
      form.append("page", String(options.page));
      form.append("filters", JSON.stringify(options.filters));
      response = await api("/v1/search/image", { method: "POST", body: form });
    }
  } catch (_) { return; }
  const result = await response.json();
  state.hits = result.hits;
  renderHits();
}

function describeQuery() {
  const q = state.query;
  if (q.kind === "text") return `“${q.text}”`;
  if (q.kind === "point") return `tiles like tile ${q.pointId.slice(0, 8)}…`;
  return `the image ${q.file.name || "pasted"}`;
}

function renderHits() {
  const gallery = $("gallery");
  gallery.replaceChildren();
  const first = (state.page - 1) * state.topK + 1;
  $("summary").textContent = state.hits.length
    ? `Results ${first}–${first + state.hits.length - 1} for ${describeQuery()}`
    : `No results for ${describeQuery()} with these filters.`;
  for (const hit of state.hits) {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.alt = `tile of ${hit.slide_id} at ${hit.x}, ${hit.y}`;
    blobUrl(hit.tile_url).then((url) => { img.src = url; }).catch(() => { img.alt = "tile image refused"; });
    const caption = document.createElement("figcaption");
    const head = document.createElement("div");
    head.innerHTML = `<b>#${hit.rank}</b> <span class="score"></span>`;
    head.querySelector(".score").textContent = `score ${hit.score.toFixed(4)}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    const extra = state.schema.map((f) => f.name).filter((n) => n in hit.payload).map((n) => `${n}: ${hit.payload[n]}`);
    meta.textContent = `${hit.slide_id} @ (${hit.x}, ${hit.y}) · ${extra.join(" · ")}`;
    caption.append(head, meta);
    card.append(img, caption);
    card.addEventListener("click", () => openViewer(hit));
    gallery.append(card);
  }
  $("pager").hidden = false;
  $("prev").disabled = state.page <= 1;
  $("next").disabled = state.hits.length < state.topK;
  $("page-label").textContent = `page ${state.page}`;
}

function setImageQuery(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("That is not an image.", "drop or paste a PNG, JPEG or TIFF image");
    return;
  }
  state.query = { kind: "image", file };
  const preview = $("drop-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  runSearch(1);
}

// -- the viewer ------------------------------------------------------------------------------

async function tileSource(slideId) {
  const base = `/v1/slides/${encodeURIComponent(slideId)}`;
  const xml = new DOMParser().parseFromString(await (await api(`${base}.dzi`)).text(), "application/xml");
  const image = xml.documentElement;
  const size = image.getElementsByTagName("Size")[0];
  return {
    Image: {
      xmlns: "http://schemas.microsoft.com/deepzoom/2008",
      Url: `${base}_files/`,
      Format: image.getAttribute("Format"),
      Overlap: image.getAttribute("Overlap"),
      TileSize: image.getAttribute("TileSize"),
      Size: { Width: size.getAttribute("Width"), Height: size.getAttribute("Height") },
    },
  };
}

async function openViewer(hit) {
  clearError();
  if (window.viewerMissing || typeof OpenSeadragon === "undefined") {
    showError("The slide viewer is not installed on this server.",
      "run the README's set-up command (npm ci in conchdb/api/web), then restart the server");
    return;
  }
  state.viewerHit = hit;
  $("viewer-panel").hidden = false;
  $("viewer-title").textContent = `${hit.slide_id}: tile at (${hit.x}, ${hit.y}), score ${hit.score.toFixed(4)}`;
  $("viewer-meta").textContent = Object.entries(hit.payload)
    .filter(([k]) => !HIDDEN_FIELDS.has(k)).map(([k, v]) => `${k}: ${v}`).join(" · ");
  const canHeatmap = state.query && state.query.kind === "text";
  $("heatmap-toggle").checked = false;
  $("heatmap-toggle").disabled = !canHeatmap;
  $("heatmap-toggle").parentElement.title = canHeatmap ? "" : "search by text first";
  let source;
  try { source = await tileSource(hit.slide_id); } catch (_) { return; }
  if (state.viewer) state.viewer.destroy();
  state.heatmapItem = null;
  state.tilesLoaded = 0;
  state.viewer = OpenSeadragon({
    element: $("viewer"),
    prefixUrl: "/viewer/images/",
    tileSources: source,
    loadTilesWithAjax: true,
    ajaxHeaders: headers(),
    showNavigator: true,
    crossOriginPolicy: false,
  });
  state.viewer.addHandler("tile-loaded", () => { state.tilesLoaded += 1; });
  state.viewer.addHandler("open", () => {
    const viewport = state.viewer.viewport;
    const rect = viewport.imageToViewportRectangle(hit.x, hit.y, hit.size, hit.size);
    const outline = document.createElement("div");
    outline.className = "outline";
    outline.id = "tile-outline";
    state.viewer.addOverlay({ element: outline, location: rect });
    const margin = rect.width * 2;
    viewport.fitBounds(new OpenSeadragon.Rect(rect.x - margin, rect.y - margin, rect.width + 2 * margin,
      rect.height + 2 * margin), true);
  });
  state.viewer.addHandler("open-failed", (event) => showError(`The slide cannot be shown: ${event.message}`));
}

async function toggleHeatmap(on) {
  const viewer = state.viewer;
  if (!viewer) return;
  if (state.heatmapItem) { viewer.world.removeItem(state.heatmapItem); state.heatmapItem = null; }
  if (!on || !state.query || state.query.kind !== "text") return;
  const slide = encodeURIComponent(state.viewerHit.slide_id);
  const params = new URLSearchParams({ query: state.query.text, ensemble: String(state.query.ensemble) });
  let url;
  try { url = await blobUrl(`/v1/slides/${slide}/heatmap.png?${params}`); } catch (_) { $("heatmap-toggle").checked = false; return; }
  viewer.addTiledImage({
    tileSource: { type: "image", url }, x: 0, y: 0, width: 1, opacity: 0.45,
    success: (event) => { state.heatmapItem = event.item; document.body.dataset.heatmap = "shown"; },
  });
}

function closeViewer() {
  $("viewer-panel").hidden = true;
  if (state.viewer) { state.viewer.destroy(); state.viewer = null; }
}

// -- wiring ----------------------------------------------------------------------------------

function wire() {
  $("text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value.trim();
    if (!text) { showError("Type what to look for.", "e.g. tumor necrosis"); return; }
    state.query = { kind: "text", text, ensemble: $("ensemble").checked };
    $("drop-preview").hidden = true;
    runSearch(1);
  });
  $("top-k").addEventListener("change", () => runSearch(1));
  $("prev").addEventListener("click", () => runSearch(state.page - 1));
  $("next").addEventListener("click", () => runSearch(state.page + 1));
  $("key-button").addEventListener("click", () => { if (askKey()) init(); });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    setImageQuery(event.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (event) => setImageQuery(event.target.files[0]));
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) setImageQuery(item.getAsFile());
  });
  $("close-viewer").addEventListener("click", closeViewer);
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeViewer(); });
  $("more-like-this").addEventListener("click", () => {
    const hit = state.viewerHit;
    closeViewer();
    state.query = { kind: "point", pointId: hit.id };
    runSearch(1);
  });
  $("heatmap-toggle").addEventListener("change", (event) => toggleHeatmap(event.target.checked));
}

// A viewer link (/?slide=ID&point=ID, the `viewer_url` of a hit) opens that tile's slide.
async function openFromLink() {
  const params = new URLSearchParams(window.location.search);
  const point = params.get("point");
  if (!point) return;
  try {
    const response = await api("/v1/search/image", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ point_id: point, top_k: 1 }),
    });
    const [hit] = (await response.json()).hits;
    if (hit) openViewer(hit);
  } catch (_) { /* the banner says why */ }
}

async function init() {
  updateKeyButton();
  await loadHealth();
  try { await loadSchema(); } catch (_) { return; }
  document.body.dataset.ready = "yes";
  openFromLink();
}

wire();
init();
