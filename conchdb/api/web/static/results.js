// What a search shows: tile cards, slide (or patient) cards with their best tiles, slide cards of
// "cases like this slide" and of the slide browser; and the current results as CSV.

import { $, blobUrl, element, facts, label, position, readable, score, shown, state, storage } from "./core.js";

export const hooks = { openHit: null, openSlide: null, casesLike: null, moreLike: null, mark: null };

// Why a hit is dimmed: it scores below the collection's noise floor.
export function weakNote(hit) {
  if (!hit.weak) return null;
  const floor = state.noiseFloor === null || state.noiseFloor === undefined ? "" : ` (${score(state.noiseFloor)})`;
  // A text query has its own floor: a text scores far lower on tissue than tissue does on tissue.
  const chance = state.view && state.view.kind === "text"
    ? "what unrelated histology terms score on its tiles by chance"
    : "the similarity that tiles of unrelated slides reach by chance";
  return element("p", { class: "weak-note small" },
    `Weak match: its score is below this collection's noise floor${floor}, ${chance}, so it is no closer to the `
    + "query than unrelated tissue.");
}

// Thumbs up and down (✓ / ✗, which every font has): mark a hit relevant or not, and search again at once.
function thumbs(hit) {
  const marked = state.view ? ((state.view.up || []).includes(hit.id) ? "up" : (state.view.down || []).includes(hit.id) ? "down" : null) : null;
  // The visible words start the button's name; the rest is for screen readers.
  const up = element("button", { type: "button", class: "thumb up", "aria-pressed": String(marked === "up") },
    "✓ relevant", element("span", { class: "sr-only" }, `: hit ${hit.rank}; search again with more like it`));
  const down = element("button", { type: "button", class: "thumb down", "aria-pressed": String(marked === "down") },
    "✗ not relevant", element("span", { class: "sr-only" }, `: hit ${hit.rank}; search again with less like it`));
  up.addEventListener("click", () => hooks.mark(hit, "up"));
  down.addEventListener("click", () => hooks.mark(hit, "down"));
  return element("div", { class: "thumbs" }, up, down);
}

function tileImage(hit, signal, alt) {
  const img = element("img", { alt, width: 160, height: 160 });
  blobUrl(hit.tile_url, signal).then((url) => { img.src = url; }).catch(() => { img.alt = `${alt} (image not available)`; });
  return img;
}

function details(payload) {
  const rows = storage(payload);
  if (!rows.length) return null;
  return element("details", { class: "storage" }, element("summary", {}, "details"), facts(rows, "facts small"));
}

// A tile: its picture, score, slide, position in µm and the slide's metadata; storage fields behind "details".
export function tileCard(hit, signal, { steerable = false } = {}) {
  const alt = `tile of slide ${hit.slide_id} ${position(hit)}`;
  const open = element("button", { type: "button", class: "card-open", "aria-label": `Open hit ${hit.rank} in the viewer: ${alt}` },
    tileImage(hit, signal, alt));
  open.addEventListener("click", () => hooks.openHit(hit, open));
  const head = element("div", { class: "card-head" }, element("span", { class: "rank" }, `#${hit.rank}`),
    element("span", { class: "score" }, `score ${score(hit.score)}`));
  const body = element("div", { class: "card-body" }, head,
    element("div", { class: "slide-name" }, hit.slide_id), element("div", { class: "muted small" }, position(hit)),
    weakNote(hit), facts(readable(hit.payload)), steerable ? thumbs(hit) : null, details(hit.payload));
  return element("article", { class: hit.weak ? "card weak" : "card", data: { id: hit.id, slide: hit.slide_id } }, open, body);
}

// A slide (or patient) of a grouped search: its best tiles, its metadata and how many hits it has.
export function groupCard(group, groupField, signal) {
  const key = groupField === "slide_id" ? group.slide_id : group.payload[groupField];
  const count = state.deepHits.filter((h) => (groupField === "slide_id" ? h.slide_id : h.payload[groupField]) === key).length;
  const tiles = element("div", { class: "group-tiles" });
  for (const tile of group.tiles || [group]) {
    const alt = `tile of slide ${tile.slide_id} ${position(tile)}, score ${score(tile.score)}`;
    const button = element("button", { type: "button", class: "card-open", "aria-label": `Open in the viewer: ${alt}` },
      tileImage(tile, signal, alt));
    button.addEventListener("click", () => hooks.openHit(tile, button));
    tiles.append(button);
  }
  const title = groupField === "slide_id" ? `Slide ${key}` : `${label(groupField)} ${shown(key)}`;
  const actions = element("div", { class: "actions" });
  if (groupField === "slide_id") {
    actions.append(element("button", { type: "button", class: "cases", onclick: () => hooks.casesLike(group.slide_id) },
      "Cases like this slide"));
  }
  const hitsText = `${count} of the best ${state.deepHits.length} tiles`;
  return element("article", { class: group.weak ? "card group weak" : "card group", data: { id: group.id, slide: group.slide_id, group: String(key) } },
    element("div", { class: "card-head" }, element("span", { class: "rank" }, `#${group.rank}`),
      element("h3", {}, title), element("span", { class: "score" }, `best ${score(group.score)}`)),
    element("div", { class: "hit-count muted small" }, hitsText), weakNote(group),
    tiles, facts(readable(group.payload)), actions, details(group.payload));
}

// A whole slide: thumbnail, metadata, and (cases like a slide) its score.
export function slideCard(slide, signal, rank) {
  const id = slide.slide_id;
  const img = element("img", { alt: `thumbnail of slide ${id}`, width: 200, height: 140 });
  blobUrl(`/v1/slides/${encodeURIComponent(id)}/thumbnail.jpg?size=256`, signal)
    .then((url) => { img.src = url; }).catch(() => { img.alt = `slide ${id} (thumbnail not available)`; });
  const open = element("button", { type: "button", class: "card-open", "aria-label": `Open slide ${id} in the viewer` }, img);
  open.addEventListener("click", () => hooks.openSlide(id, open));
  const payload = slide.payload || slide;
  const head = element("div", { class: "card-head" });
  if (rank) head.append(element("span", { class: "rank" }, `#${rank}`));
  head.append(element("h3", {}, id));
  if (slide.score !== undefined) head.append(element("span", { class: "score" }, `score ${score(slide.score)}`));
  const extra = [];
  if (payload.tiles !== undefined) extra.push(["tiles", shown(payload.tiles)]);
  if (payload.status !== undefined && payload.status !== "done") extra.push(["status", shown(payload.status)]);
  return element("article", { class: "card slide-card", data: { slide: id } }, open,
    element("div", { class: "card-body" }, head, facts([...readable(payload), ...extra]),
      element("div", { class: "actions" },
        element("button", { type: "button", class: "cases", onclick: () => hooks.casesLike(id) }, "Cases like this slide")),
      details(Object.fromEntries(Object.entries(payload).filter(([k]) => !["tiles", "status"].includes(k))))));
}

// -- export -------------------------------------------------------------------------------------

function csvCell(value) {
  const text = value === null || value === undefined ? "" : String(value);
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

// The results on screen as CSV rows (one per tile; grouped searches list each group's tiles).
export function resultsCsv() {
  const metaNames = state.fields.filter((f) => f.source === "metadata").map((f) => f.name);
  const rows = [];
  if (state.slides.length) {
    rows.push(["rank", "slide_id", "score", ...metaNames]);
    state.slides.forEach((s, i) => {
      const p = s.payload || s;
      rows.push([s.rank || i + 1, s.slide_id, s.score ?? "", ...metaNames.map((n) => p[n])]);
    });
  } else {
    rows.push(["rank", "group", "point_id", "slide_id", "score", "x_px", "y_px", "size_px", "x_um", "y_um", ...metaNames]);
    for (const hit of state.hits) {
      for (const tile of hit.tiles || [hit]) {
        const mpp = tile.payload.mpp;
        rows.push([hit.rank, hit.tiles ? hit.rank : "", tile.id, tile.slide_id, tile.score, tile.x, tile.y, tile.size,
          mpp ? Math.round(tile.x * mpp) : "", mpp ? Math.round(tile.y * mpp) : "", ...metaNames.map((n) => tile.payload[n])]);
      }
    }
  }
  return rows.map((row) => row.map(csvCell).join(",")).join("\r\n") + "\r\n";
}

export function downloadCsv(name) {
  const url = URL.createObjectURL(new Blob([resultsCsv()], { type: "text/csv" }));
  const link = element("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export function clearResults() {
  $("gallery").replaceChildren();
  $("pager").hidden = true;
  $("export").hidden = true;
  state.hits = [];
  state.slides = [];
}
