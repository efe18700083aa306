// The conchdb search page: plain JavaScript modules over the /v1 API, no build step.
//
// One search runs at a time: a new one aborts the requests of the one before (AbortController)
// and an answer is shown only if no newer search started since, so what is on screen always
// belongs to the query in the title. The state is in the URL (url.js).

import {
  $, api, askKey, blobUrl, clearError, element, isAbort, label, patientField, position, postJson, showError, state,
  updateKeyButton,
} from "./core.js";
import { buildFilters, describeFilters, filterFields, readFilters, writeFilters } from "./filters.js";
import { clearResults, downloadCsv, groupCard, hooks as cardHooks, slideCard, tileCard } from "./results.js";
import { emptyView, fromUrl, noSteering, record } from "./url.js";
import { closeViewer, hooks as viewerHooks, openViewer, wireViewer } from "./viewer.js";

const DEEP_K = 100;      // the search's best tiles, for hit counts per slide and outlines in the viewer
const GROUP_SIZE = 4;    // best tiles shown per slide (or patient)
let controller = null;   // aborts the running search's requests
let lastImage = null;    // the uploaded image ({name, file}): a URL cannot hold it

// -- the query in words -------------------------------------------------------------------------

function describeQuery(view) {
  if (view.kind === "text") return `“${view.text}”`;
  if (view.kind === "like") return "tiles like the query tile";
  if (view.kind === "region") return `tiles like a region of slide ${view.region.slide}`;
  if (view.kind === "image") return `the image ${view.fileName || "pasted"}`;
  if (view.kind === "cases") return `slides like slide ${view.slide}`;
  return "";
}

function groupField(view) {
  if (view.group === "slide") return "slide_id";
  if (view.group === "patient") return patientField();
  return null;
}

// -- running a search ---------------------------------------------------------------------------

function searchBody(view, options) {
  if (view.kind === "text") return { query: view.text, ensemble: Boolean(view.ensemble), ...options };
  if (view.kind === "like") return { point_id: view.point, ...options };
  const r = view.region;
  return { slide_id: r.slide, x: r.x, y: r.y, w: r.w, h: r.h, ...options };
}

// Concepts go with any tile search; marked hits make it a refined search (JSON queries only:
// an uploaded image is not stored, so its hits are not marked).
function refining(view) {
  return view.kind !== "image" && ((view.up || []).length > 0 || (view.down || []).length > 0);
}

function tileSearch(view, asked, signal) {
  const options = { ...asked };
  if ((view.more || []).length) options.more = view.more;
  if ((view.less || []).length) options.less = view.less;
  if (refining(view)) {
    return postJson("/v1/search/refine", { ...searchBody(view, options), like: view.up, unlike: view.down }, signal);
  }
  if (view.kind === "text") return postJson("/v1/search/text", searchBody(view, options), signal);
  if (view.kind === "image") {
    const form = new FormData();
    form.append("image", view.file);
    for (const [key, value] of Object.entries(options)) {
      if (value !== null && value !== undefined) form.append(key, typeof value === "object" ? JSON.stringify(value) : String(value));
    }
    return api("/v1/search/image", { method: "POST", body: form, signal });
  }
  return postJson("/v1/search/image", searchBody(view, options), signal);
}

// "More like this" leaves the query tile out: ask one more and drop it, renumbering the ranks.
function withoutQueryTile(hits, view, offset) {
  if (view.kind !== "like") return hits;
  const kept = [];
  for (const hit of hits) {
    if (hit.id === view.point) continue;
    if (hit.tiles) {
      hit.tiles = hit.tiles.filter((t) => t.id !== view.point);
      if (!hit.tiles.length) continue;
      Object.assign(hit, { ...hit.tiles[0], tiles: hit.tiles });
    }
    kept.push(hit);
  }
  return kept.slice(offset, offset + view.topK).map((hit, i) => ({ ...hit, rank: offset + i + 1 }));
}

function setLoading(on) {
  $("loading").hidden = !on;
  $("results").setAttribute("aria-busy", on ? "true" : "false");
  document.body.dataset.busy = on ? "yes" : "no";
}

// Show `view`: run its requests, superseding any search still running.
export async function run(view, { push = true } = {}) {
  if (controller) controller.abort();
  controller = new AbortController();
  const { signal } = controller;
  const ticket = ++state.searches;
  state.view = view;
  record(view, { replace: !push });
  clearError();
  clearResults();
  state.deepHits = [];
  showQuery(view);
  showSteering(view);
  syncControls(view);
  if (!view.kind) {
    $("summary").textContent = "Search by text, by an image, or browse the slides.";
    setLoading(false);
    if (view.open) openFromView(view); // a hit's viewer_url
    return;
  }
  if (view.kind === "image" && !view.file) {
    $("summary").textContent = `The image ${view.fileName} is not in the link: drop or choose it again to search with it.`;
    setLoading(false);
    return;
  }
  $("summary").textContent = view.kind === "browse" ? "Loading the slides…" : `Searching for ${describeQuery(view)}…`;
  setLoading(true);
  try {
    if (view.kind === "browse") await runBrowse(view, signal, ticket);
    else if (view.kind === "cases") await runCases(view, signal, ticket);
    else await runTiles(view, signal, ticket);
  } catch (error) {
    if (isAbort(error) || ticket !== state.searches) return;
    clearResults();
    $("summary").textContent = `No results for ${describeQuery(view) || "this request"}: the server refused it (see above).`;
    setLoading(false);
    return;
  }
  if (ticket !== state.searches) return;
  setLoading(false);
  document.body.dataset.shown = String(ticket);
  if (view.open) openFromView(view);
  else if (view.openSlide) openViewer({ slideId: view.openSlide });
}

async function runTiles(view, signal, ticket) {
  const by = groupField(view);
  const like = view.kind === "like";
  const offset = (view.page - 1) * view.topK;
  const filters = view.filters;
  const extra = like ? 1 : 0; // room for the query tile, which is left out
  // The search's best DEEP_K tiles (hit counts, outlines) are one request; a page of tiles within
  // them is cut from it, any other page (or grouped results) is a request of its own.
  const deepAsked = tileSearch(view, { top_k: DEEP_K + extra, page: 1, filters }, signal).then((r) => r.json());
  let mainAsked = null;
  if (by || offset + view.topK > DEEP_K) {
    const main = like
      ? { top_k: Math.min(1000, view.page * view.topK + 1), page: 1, filters }
      : { top_k: view.topK, page: view.page, filters };
    if (by) Object.assign(main, { group_by: by, group_size: GROUP_SIZE });
    mainAsked = tileSearch(view, main, signal).then((r) => r.json());
  }
  const [deep, asked] = await Promise.all([deepAsked, mainAsked]);
  if (ticket !== state.searches) return;
  if (like) state.hits = withoutQueryTile((asked || deep).hits, view, offset);
  else state.hits = asked ? asked.hits : deep.hits.slice(offset, offset + view.topK);
  if (like) describeQueryTile(deep.hits.find((h) => h.id === view.point));
  if (view.kind === "region") describeRegion(view.region, deep.hits.find((h) => h.slide_id === view.region.slide));
  state.deepHits = deep.hits.filter((h) => h.id !== view.point);
  state.noiseFloor = deep.noise_floor ?? null;
  const gallery = $("gallery");
  gallery.className = by ? "gallery groups" : "gallery tiles";
  const steerable = view.kind !== "image";
  for (const hit of state.hits) gallery.append(by ? groupCard(hit, by, signal) : tileCard(hit, signal, { steerable }));
  const weak = state.hits.filter((h) => h.weak).length;
  const first = offset + 1;
  const noun = by ? (by === "slide_id" ? "Slides" : `${label(by)[0].toUpperCase()}${label(by).slice(1)}s`) : "Results";
  const filtered = Object.keys(filters).length ? ` (${describeFilters(filters)})` : "";
  $("summary").textContent = state.hits.length
    ? `${noun} ${first}–${first + state.hits.length - 1} for ${describeQuery(view)}${filtered}`
    : `No results for ${describeQuery(view)} with these filters${filtered}.`;
  $("weak-summary").textContent = weak
    ? `${weak === state.hits.length ? "All" : weak} of these are weak matches (dimmed): they score below the `
      + "collection's noise floor, no closer to the query than unrelated tissue."
    : "";
  $("weak-summary").hidden = !weak;
  showPager(view, state.hits.length === view.topK);
}

async function runCases(view, signal, ticket) {
  const body = await (await postJson("/v1/search/slide", { slide_id: view.slide, top_k: view.topK, filters: view.filters }, signal)).json();
  if (ticket !== state.searches) return;
  state.slides = body.results;
  const gallery = $("gallery");
  gallery.className = "gallery slides";
  for (const slide of state.slides) gallery.append(slideCard(slide, signal, slide.rank));
  $("summary").textContent = state.slides.length
    ? `Cases like slide ${view.slide}: ${state.slides.length} slides`
    : `No slides like slide ${view.slide} with these filters.`;
  $("export").hidden = !state.slides.length;
}

async function runBrowse(view, signal, ticket) {
  const params = new URLSearchParams({ page: String(view.page), page_size: String(view.topK) });
  if (Object.keys(view.filters).length) params.set("filters", JSON.stringify(view.filters));
  const body = await (await api(`/v1/slides?${params}`, { signal })).json();
  if (ticket !== state.searches) return;
  state.slides = body.slides;
  state.total = body.total;
  const gallery = $("gallery");
  gallery.className = "gallery slides";
  const first = (view.page - 1) * view.topK + 1;
  state.slides.forEach((slide, i) => gallery.append(slideCard(slide, signal, first + i)));
  $("summary").textContent = state.slides.length
    ? `Slides ${first}–${first + state.slides.length - 1} of ${body.total}`
    : "No slides with these filters.";
  showPager(view, first + state.slides.length - 1 < body.total);
}

function showPager(view, more) {
  const shown = state.hits.length || state.slides.length;
  $("pager").hidden = !shown || (view.page <= 1 && !more);
  $("prev").disabled = view.page <= 1;
  $("next").disabled = !more;
  $("page-label").textContent = `page ${view.page}`;
  $("export").hidden = !shown;
}

// The query itself, shown above the results: the query tile of "more like this", the image.
function showQuery(view) {
  const box = $("query-shown");
  box.replaceChildren();
  box.hidden = true;
  if (view.kind === "like") {
    const img = element("img", { alt: "the query tile", width: 96, height: 96 });
    blobUrl(`/v1/tiles/${encodeURIComponent(view.point)}.jpg`).then((url) => { img.src = url; }).catch(() => {});
    box.append(img, element("span", {}, "Query: this tile (left out of the results)"));
    box.hidden = false;
  } else if (view.kind === "image" && view.file) {
    const img = element("img", { alt: `the query image ${view.fileName}`, width: 96, height: 96, src: URL.createObjectURL(view.file) });
    box.append(img, element("span", {}, `Query: the image ${view.fileName}`));
    box.hidden = false;
  } else if (view.kind === "region") {
    const r = view.region;
    box.append(element("span", {}, `Query: a ${r.w}×${r.h} px region of slide ${r.slide} at pixel ${r.x}, ${r.y}`));
    box.hidden = false;
  }
}

// -- steering: marked hits and concepts ------------------------------------------------------------

const TILE_KINDS = ["text", "like", "region", "image"];

function steer(changes) {
  run({ ...current({}), filters: state.view.filters, ...changes });
}

function markHit(hit, how) {
  const view = state.view;
  const up = (view.up || []).filter((id) => id !== hit.id);
  const down = (view.down || []).filter((id) => id !== hit.id);
  const already = ((how === "up" ? view.up : view.down) || []).includes(hit.id);
  if (!already) (how === "up" ? up : down).push(hit.id);
  steer({ up, down });
}

function conceptChip(c, kind, index) {
  const view = state.view;
  const id = `concept-${kind}-${index}`;
  const value = element("output", { for: id, class: "small" }, c.weight.toFixed(1));
  const slider = element("input", { id, type: "range", min: "0.1", max: "2", step: "0.1", value: String(c.weight),
    "aria-label": `weight of ${kind} ${c.text}` });
  slider.addEventListener("input", () => { value.textContent = Number(slider.value).toFixed(1); });
  slider.addEventListener("change", () => {
    const list = view[kind].map((x, i) => (i === index ? { ...x, weight: Number(slider.value) } : x));
    steer({ [kind]: list });
  });
  const remove = element("button", { type: "button", class: "chip-remove", "aria-label": `remove ${kind} ${c.text}`,
    onclick: () => steer({ [kind]: view[kind].filter((_, i) => i !== index) }) }, "✕");
  return element("span", { class: `chip ${kind}`, data: { kind, text: c.text } },
    element("label", { for: id }, `${kind} ${c.text}`), slider, value, remove);
}

function markChip(id, how) {
  const img = element("img", { alt: `tile marked ${how === "up" ? "relevant" : "not relevant"}`, width: 40, height: 40 });
  blobUrl(`/v1/tiles/${encodeURIComponent(id)}.jpg`).then((url) => { img.src = url; }).catch(() => {});
  const unmark = element("button", { type: "button", class: "chip-remove", "aria-label": "unmark this tile",
    onclick: () => steer({ up: state.view.up.filter((x) => x !== id), down: state.view.down.filter((x) => x !== id) }) }, "✕");
  return element("span", { class: `chip mark ${how}`, data: { id } }, element("span", {}, how === "up" ? "✓" : "✗"), img, unmark);
}

// The refine bar above the results: the marked hits (left out of the results) and the concepts.
function showSteering(view) {
  const box = $("steer");
  box.hidden = !TILE_KINDS.includes(view.kind);
  if (box.hidden) return;
  const marks = $("steer-marks");
  marks.replaceChildren(...(view.up || []).map((id) => markChip(id, "up")), ...(view.down || []).map((id) => markChip(id, "down")));
  $("steer-marks-note").textContent = marks.childElementCount
    ? "Marked hits (left out of the results): the search moves toward ✓ and away from ✗."
    : (view.kind === "image" ? "" : "Mark hits ✓ relevant or ✗ not relevant to search again toward what you want.");
  $("steer-concepts").replaceChildren(...(view.more || []).map((c, i) => conceptChip(c, "more", i)),
    ...(view.less || []).map((c, i) => conceptChip(c, "less", i)));
}

// "More like this": say which tile the query is (the search finds it first, and leaves it out).
function describeQueryTile(hit) {
  const text = $("query-shown").querySelector("span");
  if (hit && text) text.textContent = `Query: this tile of slide ${hit.slide_id}, ${position(hit)} (left out of the results)`;
}

// A region in µm, once a hit of its slide gives the slide's pixel size.
function describeRegion(r, hitOfSlide) {
  const text = $("query-shown").querySelector("span");
  const mpp = hitOfSlide && hitOfSlide.payload.mpp;
  if (!text || !mpp) return;
  const um = (v) => Math.round(v * mpp).toLocaleString("en");
  text.textContent = `Query: a ${um(r.w)} × ${um(r.h)} µm region of slide ${r.slide}, at ${um(r.x)} µm, ${um(r.y)} µm`;
}

// The form shows the view's query, filters, grouping and page size.
function syncControls(view) {
  $("text").value = view.kind === "text" ? view.text : "";
  $("ensemble").checked = view.kind === "text" && Boolean(view.ensemble);
  const perPage = $("top-k");
  if (![...perPage.options].some((o) => o.value === String(view.topK))) perPage.add(new Option(String(view.topK))); // from a link
  perPage.value = String(view.topK);
  for (const radio of document.querySelectorAll("input[name=group]")) radio.checked = radio.value === view.group;
  writeFilters(view.filters);
}

// Open the viewer on the view's `open` tile: from the results, or asked of the server.
async function openFromView(view) {
  const hit = [...state.hits.flatMap((h) => h.tiles || [h]), ...state.deepHits].find((h) => h.id === view.open);
  if (hit) { openViewer({ hit, from: cardButton(hit.id) }); return; }
  try {
    const body = await (await postJson("/v1/search/image", { point_id: view.open, top_k: 1 })).json();
    if (body.hits[0]) openViewer({ hit: { ...body.hits[0], rank: "" } });
  } catch (_) { /* the banner says why */ }
}

function cardButton(id) {
  const card = document.querySelector(`.card[data-id="${CSS.escape(id)}"] .card-open`);
  return card || null;
}

// -- new searches -------------------------------------------------------------------------------

function current(changes) {
  const base = state.view || emptyView();
  return { ...base, open: null, openSlide: null, page: 1, ...changes };
}

function newSearch(changes) {
  const filters = readFilters();
  if (filters === null) return; // the form says which range is impossible
  run(current({ filters, ...changes }));
}

function setImageQuery(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("That file is not an image.", "drop, paste or choose a PNG, JPEG or TIFF picture of tissue");
    return;
  }
  lastImage = { name: file.name || "pasted", file };
  $("drop-preview").src = URL.createObjectURL(file);
  $("drop-preview").hidden = false;
  newSearch({ kind: "image", file, fileName: lastImage.name, ...noSteering() });
}

// -- wiring -------------------------------------------------------------------------------------

function wire() {
  $("text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value.trim();
    if (!text) { showError("Type what to look for.", "describe the tissue in words, e.g. tumor necrosis"); return; }
    $("drop-preview").hidden = true;
    newSearch({ kind: "text", text, ensemble: $("ensemble").checked, ...noSteering() });
  });
  $("top-k").addEventListener("change", () => { if (state.view && state.view.kind) newSearch({ topK: Number($("top-k").value) }); });
  for (const radio of document.querySelectorAll("input[name=group]")) {
    radio.addEventListener("change", () => {
      if (state.view && state.view.kind && !["cases", "browse"].includes(state.view.kind)) newSearch({ group: radio.value });
      else if (state.view) state.view.group = radio.value;
    });
  }
  $("prev").addEventListener("click", () => run({ ...state.view, open: null, openSlide: null, page: state.view.page - 1 }));
  $("next").addEventListener("click", () => run({ ...state.view, open: null, openSlide: null, page: state.view.page + 1 }));
  $("browse").addEventListener("click", () => newSearch({ kind: "browse", group: "tiles", ...noSteering() }));
  $("concept-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("concept-text").value.trim();
    if (!text || !state.view) return;
    const kind = $("concept-kind").value;
    $("concept-text").value = "";
    steer({ [kind]: [...(state.view[kind] || []), { text, weight: 0.5 }] });
  });
  $("export").addEventListener("click", () => downloadCsv("conchdb-results.csv"));
  $("key-button").addEventListener("click", () => { if (askKey()) init(); });
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    setImageQuery(event.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (event) => { setImageQuery(event.target.files[0]); event.target.value = ""; });
  document.addEventListener("paste", (event) => {
    const item = [...((event.clipboardData || {}).items || [])].find((i) => i.type.startsWith("image/"));
    if (item) setImageQuery(item.getAsFile());
  });
  window.addEventListener("popstate", () => restore());
  cardHooks.openHit = (hit, from) => openViewer({ hit, from });
  cardHooks.openSlide = (slideId, from) => openViewer({ slideId, from });
  cardHooks.casesLike = (slideId) => { closeViewer(); newSearch({ kind: "cases", slide: slideId, group: "tiles", ...noSteering() }); };
  cardHooks.mark = markHit;
  viewerHooks.casesLike = cardHooks.casesLike;
  viewerHooks.moreLike = (hit) => { closeViewer(); newSearch({ kind: "like", point: hit.id, ...noSteering() }); };
  viewerHooks.regionSearch = (region) => { closeViewer(); newSearch({ kind: "region", region, ...noSteering() }); };
  viewerHooks.onOpen = (hit, slide) => {
    if (!state.view) return;
    Object.assign(state.view, hit ? { open: hit.id, openSlide: null } : { open: null, openSlide: slide });
    record(state.view, { replace: true });
  };
  viewerHooks.onClose = () => {
    if (!state.view) return;
    Object.assign(state.view, { open: null, openSlide: null });
    record(state.view, { replace: true });
  };
  wireViewer();
}

// Show what the URL says (a reload, a pasted link, the back button).
function restore() {
  state.view = null; // the URL already says what to show: closing the viewer must not rewrite it
  closeViewer();
  const view = fromUrl(window.location.search);
  if (view.kind === "image" && lastImage && lastImage.name === view.fileName) view.file = lastImage.file;
  if (view.kind === "image" && !view.file) view.fileName = view.fileName || "pasted";
  run(view, { push: false });
}

async function loadHealth() {
  try {
    const health = await (await fetch("/v1/health")).json();
    $("health").textContent = health.status === "ok"
      ? `${health.points} tiles · model ready`
      : `not ready: store ${health.store ? "ok" : "missing"}, model ${health.model ? "ok" : "missing"}`;
  } catch (_) {
    $("health").textContent = "the server cannot be reached";
  }
}

async function init() {
  updateKeyButton();
  await loadHealth();
  try {
    state.fields = (await (await api("/v1/fields")).json()).fields;
  } catch (_) { return; }
  buildFilters(() => {
    if (state.view && state.view.kind && state.view.kind !== "image") newSearch({});
    else if (state.view && state.view.kind === "image" && state.view.file) newSearch({});
    else readFilters();
  });
  $("group-patient").hidden = !patientField();
  $("filters-note").hidden = !filterFields().length;
  document.body.dataset.ready = "yes";
  restore();
}

wire();
init();