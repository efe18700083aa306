// The page's state in its URL, so that a search can be shared, bookmarked, restored by reload,
// and stepped back through with the browser's back button.
//
//   ?q=tumor&ens=1            a text search (with the prompt ensemble)
//   ?like=POINT_ID            tiles like a stored tile ("more like this")
//   ?region=SLIDE@x,y,w,h     tiles like a rectangle of a stored slide (level-0 pixels)
//   ?cases=SLIDE_ID           slides like a stored slide
//   ?browse=1                 the slide browser
//   ?image=NAME               an uploaded image: its pixels are not in the link, so a reload asks for it again
//   &f={"diagnosis":{"in":["adenoma"]}}  filters     &group=slide|patient     &page=2     &k=48
//   &open=POINT_ID            the viewer open on that tile  (&openslide=SLIDE_ID: on a slide without a tile)
//   &up=ID&down=ID            hits marked relevant / not relevant (refine by example; repeated)
//   &more=TEXT:W&less=TEXT:W  concepts to add or subtract, with their weights (refine by concept; repeated)
// A hit's `viewer_url` (/?slide=SLIDE_ID&point=POINT_ID) opens the viewer on that tile.

export const DEFAULT_K = 24;

export function emptyView() {
  return { kind: null, filters: {}, group: "tiles", page: 1, topK: DEFAULT_K, open: null, openSlide: null, ...noSteering() };
}

// A query as first asked: no hits marked, no concepts.
export function noSteering() {
  return { up: [], down: [], more: [], less: [] };
}

function concept(text) {
  const at = text.lastIndexOf(":");
  const weight = at > 0 ? Number(text.slice(at + 1)) : NaN;
  return Number.isFinite(weight) ? { text: text.slice(0, at), weight } : { text, weight: 0.5 };
}

export function fromUrl(search) {
  const params = new URLSearchParams(search);
  const view = emptyView();
  if (params.has("q")) Object.assign(view, { kind: "text", text: params.get("q"), ensemble: params.get("ens") === "1" });
  else if (params.has("like")) Object.assign(view, { kind: "like", point: params.get("like") });
  else if (params.has("region")) {
    const text = params.get("region");
    const at = text.lastIndexOf("@");
    const [x, y, w, h] = text.slice(at + 1).split(",").map(Number);
    if (at > 0 && [x, y, w, h].every(Number.isFinite)) {
      Object.assign(view, { kind: "region", region: { slide: text.slice(0, at), x, y, w, h } });
    }
  } else if (params.has("cases")) Object.assign(view, { kind: "cases", slide: params.get("cases") });
  else if (params.has("browse")) view.kind = "browse";
  else if (params.has("image")) Object.assign(view, { kind: "image", fileName: params.get("image"), file: null });
  try {
    const filters = JSON.parse(params.get("f") || "{}");
    if (filters && typeof filters === "object" && !Array.isArray(filters)) view.filters = filters;
  } catch (_) { /* a damaged link: no filters */ }
  if (["slide", "patient"].includes(params.get("group"))) view.group = params.get("group");
  view.page = Math.max(1, parseInt(params.get("page") || "1", 10) || 1);
  view.topK = parseInt(params.get("k") || String(DEFAULT_K), 10) || DEFAULT_K;
  view.open = params.get("open") || (params.has("point") && !view.kind ? params.get("point") : null);
  view.openSlide = params.get("openslide");
  view.up = params.getAll("up");
  view.down = params.getAll("down");
  view.more = params.getAll("more").map(concept);
  view.less = params.getAll("less").map(concept);
  return view;
}

export function toUrl(view) {
  const params = new URLSearchParams();
  if (view.kind === "text") { params.set("q", view.text); if (view.ensemble) params.set("ens", "1"); }
  if (view.kind === "like") params.set("like", view.point);
  if (view.kind === "region") {
    const r = view.region;
    params.set("region", `${r.slide}@${r.x},${r.y},${r.w},${r.h}`);
  }
  if (view.kind === "cases") params.set("cases", view.slide);
  if (view.kind === "browse") params.set("browse", "1");
  if (view.kind === "image") params.set("image", view.fileName || "pasted");
  if (Object.keys(view.filters || {}).length) params.set("f", JSON.stringify(view.filters));
  if (view.group !== "tiles") params.set("group", view.group);
  if (view.page > 1) params.set("page", String(view.page));
  if (view.topK !== DEFAULT_K) params.set("k", String(view.topK));
  if (view.open) params.set("open", view.open);
  if (view.openSlide) params.set("openslide", view.openSlide);
  for (const id of view.up || []) params.append("up", id);
  for (const id of view.down || []) params.append("down", id);
  for (const c of view.more || []) params.append("more", `${c.text}:${c.weight}`);
  for (const c of view.less || []) params.append("less", `${c.text}:${c.weight}`);
  const text = params.toString();
  return text ? `/?${text}` : "/";
}

// The URL for `view`: a new history entry for a new search, the same entry when only the
// viewer opens or closes (back steps through searches, not through every tile looked at).
export function record(view, { replace = false } = {}) {
  const url = toUrl(view);
  if (url === window.location.pathname + window.location.search) return;
  if (replace) window.history.replaceState(null, "", url);
  else window.history.pushState(null, "", url);
}
