// The slide viewer (OpenSeadragon): a scale bar in µm from the slide's pixel size, every hit of
// the current search on the slide outlined (the current one emphasised), previous/next hit by
// key, a rectangle drawn (or the visible area) searched as a region, the text query's heatmap
// with its legend and an opacity slider, and describe / classify of the current tile on demand.

import {
  $, api, clearError, element, facts, field, headers, position, postJson, readable, score, shown, showError, state,
  storage,
} from "./core.js";

export const hooks = { onOpen: null, onClose: null, regionSearch: null, casesLike: null, moreLike: null };

// matplotlib's viridis at nine stops, as conchdb/search/heatmap.py colours the overlay.
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#fde725"];

let returnFocus = null;
let slideInfo = null; // GET /v1/slides/{id}: the record (mpp, width, height) of the open slide
let drawing = null;   // the rectangle being drawn: {start, box}
let tracker = null;   // the mouse tracker that draws rectangles on the open slide

// -- hits on screen -----------------------------------------------------------------------------

// The tiles of the current results, in reading order (a group's tiles in turn).
function sequence() {
  const tiles = [];
  for (const hit of state.hits) for (const tile of hit.tiles || [hit]) tiles.push(tile);
  return tiles;
}

// Every hit of the current search on a slide: the results on screen and the search's best tiles.
export function hitsOnSlide(slideId) {
  const seen = new Map();
  for (const hit of [...sequence(), ...state.deepHits]) if (hit.slide_id === slideId && !seen.has(hit.id)) seen.set(hit.id, hit);
  return [...seen.values()];
}

// The hits on a slide as the GeoJSON QuPath imports (drag the file onto the slide): the layout
// conchdb/search/geojson.py writes for `search --export-geojson` and `/v1/slides/{id}/hits.geojson`,
// one annotation per tile, a closed level-0 square, classified as a hit or a weak hit.
export function slideGeojson(slideId) {
  const features = hitsOnSlide(slideId).filter((t) => t.x != null && t.size != null).map((t) => ({
    type: "Feature",
    id: t.id,
    geometry: { type: "Polygon", coordinates: [[[t.x, t.y], [t.x + t.size, t.y], [t.x + t.size, t.y + t.size],
      [t.x, t.y + t.size], [t.x, t.y]]] },
    properties: {
      objectType: "annotation",
      name: `#${t.rank} ${Number(t.score).toFixed(3)}`,
      classification: t.weak ? { name: "conchdb weak hit", color: [150, 150, 150] }
        : { name: "conchdb hit", color: [230, 97, 0] },
      isLocked: false,
      measurements: { score: Number(t.score), rank: t.rank },
    },
  }));
  return { type: "FeatureCollection", features };
}

function downloadGeojson() {
  const slide = state.viewerSlide;
  if (!slide) return;
  const text = JSON.stringify(slideGeojson(slide));
  const url = URL.createObjectURL(new Blob([text], { type: "application/geo+json" }));
  const name = `${String(slide).split("/").pop()}.geojson`;
  const link = element("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// -- opening and closing ------------------------------------------------------------------------

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

function viewerMissing() {
  if (window.viewerMissing || typeof OpenSeadragon === "undefined") {
    showError("The slide viewer is not installed on this server.",
      "run the README's set-up command (npm ci in conchdb/api/web), then restart the server");
    return true;
  }
  return false;
}

// Open the viewer on a hit (centred on its tile) or on a whole slide (hit null).
export async function openViewer({ hit = null, slideId = null, from = null }) {
  clearError();
  if (viewerMissing()) return;
  const slide = hit ? hit.slide_id : slideId;
  if (from) returnFocus = from;
  const panel = $("viewer-panel");
  const wasOpen = !panel.hidden;
  state.viewerHit = hit;
  panel.hidden = false;
  document.body.classList.add("viewer-open");
  $("main").inert = true;
  $("viewer-title").textContent = hit
    ? `Slide ${slide}: hit #${hit.rank}, score ${score(hit.score)}, ${position(hit)}`
    : `Slide ${slide}`;
  if (!wasOpen) $("viewer-title").focus();
  updateControls();
  showFacts(hit, slide);
  $("viewer-answers").replaceChildren();
  if (hooks.onOpen) hooks.onOpen(hit, slide);
  if (state.viewer && state.viewerSlide === slide && state.viewer.world.getItemCount() > 0) {
    drawOutlines();
    focusHit(false);
    return;
  }
  state.viewerSlide = slide;
  $("viewer-hint").textContent = "Loading the slide…";
  let source;
  try {
    [source, slideInfo] = await Promise.all([tileSource(slide), slideRecord(slide)]);
  } catch (_) { $("viewer-hint").textContent = "The slide cannot be shown (see above)."; return; }
  if (state.viewerSlide !== slide) return; // another slide was opened meanwhile
  showFacts(hit, slide);
  if (state.viewer) state.viewer.destroy();
  state.heatmapItem = null;
  state.tilesLoaded = 0;
  $("heatmap-toggle").checked = false;
  $("legend").hidden = true;
  const viewer = OpenSeadragon({
    element: $("viewer"),
    prefixUrl: "/viewer/images/",
    tileSources: source,
    loadTilesWithAjax: true,
    ajaxHeaders: headers(),
    showNavigator: true,
    navigatorPosition: "TOP_RIGHT",
    crossOriginPolicy: false,
    gestureSettingsMouse: { clickToZoom: false },
  });
  state.viewer = viewer;
  viewer.addHandler("tile-loaded", () => { state.tilesLoaded += 1; });
  viewer.addHandler("open", () => {
    $("viewer-hint").textContent = "";
    drawOutlines();
    focusHit(true);
    updateScalebar();
    setUpDrawing(viewer);
  });
  viewer.addHandler("animation", updateScalebar);
  viewer.addHandler("resize", updateScalebar);
  viewer.addHandler("open-failed", () => { $("viewer-hint").textContent = ""; });
  viewer.addHandler("open-failed", (event) => showError(`The slide cannot be shown: ${event.message}`,
    "the slide file must stay where it was ingested from"));
}

async function slideRecord(slideId) {
  const body = await (await api(`/v1/slides/${encodeURIComponent(slideId)}`)).json();
  return body.records[0] || {};
}

export function closeViewer() {
  const panel = $("viewer-panel");
  if (panel.hidden) return;
  panel.hidden = true;
  document.body.classList.remove("viewer-open");
  $("main").inert = false;
  stopDrawing();
  if (tracker) { tracker.destroy(); tracker = null; }
  if (state.viewer) { state.viewer.destroy(); state.viewer = null; }
  state.viewerHit = null;
  state.viewerSlide = null;
  delete document.body.dataset.heatmap;
  if (hooks.onClose) hooks.onClose();
  const target = returnFocus && returnFocus.isConnected ? returnFocus : document.querySelector(".card .card-open");
  returnFocus = null;
  if (target) target.focus();
}

function showFacts(hit, slide) {
  const payload = hit ? hit.payload : (slideInfo || {});
  const pairs = [["slide", slide], ...readable(payload)];
  if (hit) pairs.push(["position", position(hit)]);
  if (slideInfo && slideInfo.mpp) pairs.push(["pixel size", `${shown(slideInfo.mpp)} µm`]);
  const box = $("viewer-facts");
  box.replaceChildren(facts(pairs));
  const rest = storage(payload);
  if (rest.length) box.append(element("details", { class: "storage" }, element("summary", {}, "details"), facts(rest, "facts small")));
}

function updateControls() {
  const hit = state.viewerHit;
  const list = sequence();
  const i = hit ? list.findIndex((h) => h.id === hit.id) : -1;
  $("prev-hit").disabled = i <= 0;
  $("next-hit").disabled = i < 0 || i >= list.length - 1;
  $("hit-position").textContent = i >= 0 ? `hit ${i + 1} of ${list.length}` : "";
  $("more-like-this").disabled = !hit;
  $("describe").disabled = !hit;
  $("classify").disabled = !hit;
  const text = state.view && state.view.kind === "text";
  $("heatmap-toggle").disabled = !text;
  $("heatmap-label").title = text ? "" : "a heatmap needs a text search";
}

// Previous (-1) or next (+1) hit of the results, across slides.
export function stepHit(delta) {
  const list = sequence();
  const hit = state.viewerHit;
  const i = hit ? list.findIndex((h) => h.id === hit.id) : -1;
  const next = list[i + delta];
  if (i < 0 || !next) return;
  openViewer({ hit: next });
}

// -- outlines and scale bar ---------------------------------------------------------------------

function drawOutlines() {
  const viewer = state.viewer;
  if (!viewer || viewer.world.getItemCount() === 0) return;
  viewer.clearOverlays();
  const current = state.viewerHit;
  const hits = hitsOnSlide(state.viewerSlide);
  if (current && !hits.some((h) => h.id === current.id)) hits.push(current);
  for (const hit of hits) {
    const isCurrent = current && hit.id === current.id;
    const outline = element("div", {
      class: isCurrent ? "outline current" : "outline",
      title: `hit #${hit.rank}, score ${score(hit.score)}`,
      data: { id: hit.id },
    });
    if (isCurrent) outline.id = "tile-outline";
    viewer.addOverlay({ element: outline, location: viewer.viewport.imageToViewportRectangle(hit.x, hit.y, hit.size, hit.size) });
  }
  $("viewer").dataset.outlines = String(hits.length);
}

function focusHit(immediately) {
  const viewer = state.viewer;
  const hit = state.viewerHit;
  if (!viewer || !hit) return;
  const rect = viewer.viewport.imageToViewportRectangle(hit.x, hit.y, hit.size, hit.size);
  const margin = rect.width * 2;
  viewer.viewport.fitBounds(new OpenSeadragon.Rect(rect.x - margin, rect.y - margin, rect.width + 2 * margin,
    rect.height + 2 * margin), immediately);
}

function niceLength(um) {
  const power = 10 ** Math.floor(Math.log10(um));
  for (const step of [5, 2, 1]) if (step * power <= um) return step * power;
  return power;
}

// The scale bar: a round length in µm about 120 screen pixels long, and the magnification
// that shows the slide at this size (10× ≈ 1 µm per screen pixel).
function updateScalebar() {
  const bar = $("scalebar");
  const viewer = state.viewer;
  const mpp = slideInfo && slideInfo.mpp;
  if (!viewer || !mpp || viewer.world.getItemCount() === 0) { bar.hidden = true; return; }
  const zoom = viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true)); // screen px per level-0 px
  const umPerScreenPx = mpp / zoom;
  const um = niceLength(120 * umPerScreenPx);
  const width = um / umPerScreenPx;
  const text = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
  $("scalebar-line").style.width = `${Math.round(width)}px`;
  const magnification = 10 / umPerScreenPx;
  const mag = magnification >= 10 ? Math.round(magnification) : Math.round(magnification * 10) / 10;
  $("scalebar-text").textContent = `${text} · as at ≈${mag}×`;
  bar.dataset.mpp = String(mpp);
  bar.dataset.um = String(um);
  bar.hidden = false;
}

// -- regions ------------------------------------------------------------------------------------

function setUpDrawing(viewer) {
  if (tracker) tracker.destroy();
  tracker = new OpenSeadragon.MouseTracker({
    element: viewer.canvas,
    pressHandler: (event) => {
      if (!$("draw-region").getAttribute("aria-pressed").startsWith("t")) return;
      const start = viewer.viewport.viewerElementToImageCoordinates(event.position);
      const box = element("div", { class: "region-box", id: "region-box" });
      drawing = { start, box };
      viewer.addOverlay({ element: box, location: viewer.viewport.imageToViewportRectangle(start.x, start.y, 1, 1) });
    },
    dragHandler: (event) => {
      if (!drawing) return;
      const rect = imageRect(drawing.start, viewer.viewport.viewerElementToImageCoordinates(event.position));
      viewer.updateOverlay(drawing.box, viewer.viewport.imageToViewportRectangle(rect.x, rect.y, rect.w, rect.h));
    },
    releaseHandler: (event) => {
      if (!drawing) return;
      const rect = imageRect(drawing.start, viewer.viewport.viewerElementToImageCoordinates(event.position));
      drawing = null;
      stopDrawing();
      if (rect.w >= 8 && rect.h >= 8) searchRegion(rect);
    },
  });
}

function imageRect(a, b) {
  const width = slideInfo && slideInfo.width ? slideInfo.width : Infinity;
  const height = slideInfo && slideInfo.height ? slideInfo.height : Infinity;
  const x0 = Math.max(0, Math.round(Math.min(a.x, b.x))), y0 = Math.max(0, Math.round(Math.min(a.y, b.y)));
  const x1 = Math.min(width, Math.round(Math.max(a.x, b.x))), y1 = Math.min(height, Math.round(Math.max(a.y, b.y)));
  return { x: x0, y: y0, w: Math.max(0, x1 - x0), h: Math.max(0, y1 - y0) };
}

function startDrawing() {
  $("draw-region").setAttribute("aria-pressed", "true");
  $("viewer").classList.add("drawing");
  if (state.viewer) state.viewer.setMouseNavEnabled(false);
  $("viewer-hint").textContent = "Drag a rectangle on the slide: the tiles that look like it are searched. Escape cancels.";
}

function stopDrawing() {
  $("draw-region").setAttribute("aria-pressed", "false");
  $("viewer").classList.remove("drawing");
  $("viewer-hint").textContent = "";
  if (state.viewer) state.viewer.setMouseNavEnabled(true);
  const box = $("region-box");
  if (box && state.viewer) state.viewer.removeOverlay(box);
}

function searchRegion(rect) {
  const region = { slide: state.viewerSlide, ...rect };
  hooks.regionSearch(region);
}

function searchVisible() {
  const viewer = state.viewer;
  if (!viewer) return;
  const bounds = viewer.viewport.viewportToImageRectangle(viewer.viewport.getBounds(true));
  const rect = imageRect({ x: bounds.x, y: bounds.y }, { x: bounds.x + bounds.width, y: bounds.y + bounds.height });
  if (rect.w > 0 && rect.h > 0) searchRegion(rect);
}

// -- heatmap ------------------------------------------------------------------------------------

async function toggleHeatmap(on) {
  const viewer = state.viewer;
  if (!viewer) return;
  if (state.heatmapItem) { viewer.world.removeItem(state.heatmapItem); state.heatmapItem = null; }
  $("legend").hidden = true;
  delete document.body.dataset.heatmap;
  if (!on || !state.view || state.view.kind !== "text") return;
  const slide = encodeURIComponent(state.viewerSlide);
  const params = new URLSearchParams({ query: state.view.text, ensemble: String(Boolean(state.view.ensemble)) });
  if (Object.keys(state.view.filters).length) params.set("filters", JSON.stringify(state.view.filters));
  let response;
  $("viewer-hint").textContent = "Loading the heatmap…";
  try {
    response = await api(`/v1/slides/${slide}/heatmap.png?${params}`);
  } catch (_) {
    $("heatmap-toggle").checked = false;
    $("viewer-hint").textContent = "";
    return;
  }
  const low = Number(response.headers.get("X-Score-Low")), high = Number(response.headers.get("X-Score-High"));
  const url = URL.createObjectURL(await response.blob());
  viewer.addTiledImage({
    tileSource: { type: "image", url }, x: 0, y: 0, width: 1, opacity: Number($("heatmap-opacity").value) / 100,
    success: (event) => {
      state.heatmapItem = event.item;
      document.body.dataset.heatmap = "shown";
      $("viewer-hint").textContent = "";
      $("legend-low").textContent = score(low);
      $("legend-high").textContent = score(high);
      $("legend").hidden = false;
    },
  });
}

// -- describe and classify ----------------------------------------------------------------------

async function describe() {
  const hit = state.viewerHit;
  if (!hit) return;
  const box = $("viewer-answers");
  box.replaceChildren(element("p", { class: "muted", role: "status" }, "Describing the tile…"));
  try {
    const body = await (await postJson("/v1/describe", { point_id: hit.id, top_k: 5 })).json();
    const list = element("ol", { class: "answers" });
    for (const t of body.texts) list.append(element("li", {}, `${t.text} `, element("span", { class: "muted small" }, score(t.score))));
    box.replaceChildren(element("h3", {}, "Texts closest to this tile"), list);
  } catch (_) { box.replaceChildren(); }
}

function defaultLabels() {
  const diagnosis = field("diagnosis");
  if (diagnosis && diagnosis.values && diagnosis.values.length >= 2) return diagnosis.values.map((v) => v.value).join(", ");
  return "tumor, stroma, normal tissue";
}

async function classify() {
  const hit = state.viewerHit;
  if (!hit) return;
  const input = $("classify-labels");
  if (!input.value.trim()) input.value = defaultLabels();
  const labels = input.value.split(",").map((t) => t.trim()).filter(Boolean);
  const box = $("viewer-answers");
  if (labels.length < 2) { box.replaceChildren(element("p", { role: "alert" }, "Give two or more classes, separated by commas.")); return; }
  box.replaceChildren(element("p", { class: "muted", role: "status" }, "Classifying the tile…"));
  try {
    const body = await (await postJson("/v1/classify", { point_id: hit.id, labels })).json();
    const list = element("ol", { class: "answers" });
    for (const c of body.classes) list.append(element("li", {}, `${c.label}: ${Math.round(c.probability * 100)} %`));
    box.replaceChildren(element("h3", {}, `Zero-shot class: ${body.prediction}`), list);
  } catch (_) { box.replaceChildren(); }
}

// -- wiring -------------------------------------------------------------------------------------

export function wireViewer() {
  $("legend-bar").style.background = `linear-gradient(to right, ${VIRIDIS.join(", ")})`;
  $("close-viewer").addEventListener("click", closeViewer);
  $("prev-hit").addEventListener("click", () => stepHit(-1));
  $("next-hit").addEventListener("click", () => stepHit(1));
  $("more-like-this").addEventListener("click", () => { const hit = state.viewerHit; if (hit) hooks.moreLike(hit); });
  $("cases-like-slide").addEventListener("click", () => { const slide = state.viewerSlide; if (slide) hooks.casesLike(slide); });
  $("draw-region").addEventListener("click", () => {
    if ($("draw-region").getAttribute("aria-pressed") === "true") stopDrawing(); else startDrawing();
  });
  $("search-visible").addEventListener("click", searchVisible);
  $("export-geojson").addEventListener("click", downloadGeojson);
  $("heatmap-toggle").addEventListener("change", (event) => toggleHeatmap(event.target.checked));
  $("heatmap-opacity").addEventListener("input", (event) => {
    const value = Number(event.target.value);
    $("heatmap-opacity-value").textContent = `${value} %`;
    if (state.heatmapItem) state.heatmapItem.setOpacity(value / 100);
  });
  $("describe").addEventListener("click", describe);
  $("classify-form").addEventListener("submit", (event) => { event.preventDefault(); classify(); });
  document.addEventListener("keydown", (event) => {
    if ($("viewer-panel").hidden) return;
    const typing = event.target.closest && event.target.closest("input, textarea, select");
    if (event.key === "Escape") {
      if ($("draw-region").getAttribute("aria-pressed") === "true") stopDrawing(); else closeViewer();
      event.preventDefault();
    } else if (!typing && (event.key === "n" || event.key === "N")) { stepHit(1); event.preventDefault(); }
    else if (!typing && (event.key === "p" || event.key === "P")) { stepHit(-1); event.preventDefault(); }
  });
  // Keep Tab inside the open viewer (a modal dialog).
  $("viewer-panel").addEventListener("keydown", (event) => {
    if (event.key !== "Tab") return;
    const focusable = [...$("viewer-panel").querySelectorAll("button:not([disabled]), input:not([disabled]), summary, [tabindex='0']")]
      .filter((el) => el.offsetParent !== null);
    if (!focusable.length) return;
    const first = focusable[0], last = focusable[focusable.length - 1];
    if (event.shiftKey && document.activeElement === first) { last.focus(); event.preventDefault(); }
    else if (!event.shiftKey && document.activeElement === last) { first.focus(); event.preventDefault(); }
  });
}
