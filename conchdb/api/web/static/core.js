// Shared by the page's modules: the state, the API key, fetch() on the API, the banner, words.
// Every request carries the API key (asked once, kept in sessionStorage); images are fetched
// with it and shown from blob URLs, since <img> cannot send headers.

const KEY_STORE = "conchdb-api-key";

export const $ = (id) => document.getElementById(id);

export const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  fields: [],        // GET /v1/fields: name, type, source ("metadata" | "conchdb"), values, min, max
  view: null,        // what is asked and shown: see url.js
  hits: [],          // the results on screen (tiles, or groups with .tiles)
  slides: [],        // slide cards on screen (cases like a slide, the slide browser)
  deepHits: [],      // the best DEEP_K tiles of the current search: counts per slide, outlines in the viewer
  total: null,       // the slide browser's number of slides
  viewer: null,
  viewerHit: null,
  viewerSlide: null,
  heatmapItem: null,
  tilesLoaded: 0,
  searches: 0,       // searches started; an answer is shown only if no newer one was started
  noiseFloor: null,  // the collection's noise floor, from the last search's answer
};
window.conchdb = state; // for the browser tests and for curious users

// Fields a pathologist reads on a card, in this order, where the collection has them.
export const PATIENT_FIELDS = ["patient_id", "patient", "case_id", "subject_id"];
export const READ_FIRST = [...PATIENT_FIELDS, "diagnosis", "site", "organ", "grade", "stage"];

export function headers(extra = {}) {
  return state.key ? { "X-API-Key": state.key, ...extra } : extra;
}

export function showError(message, fix) {
  const banner = $("banner");
  banner.replaceChildren();
  const text = document.createElement("span");
  text.textContent = message;
  banner.append(text);
  if (fix) {
    const hint = document.createElement("span");
    hint.className = "fix";
    hint.textContent = "What to do: " + fix;
    banner.append(hint);
  }
  banner.hidden = false;
}

export function clearError() { $("banner").hidden = true; }

export function askKey() {
  const given = window.prompt("This server needs an API key. It is kept for this browser session only.", state.key);
  if (given === null) return false;
  state.key = given.trim();
  sessionStorage.setItem(KEY_STORE, state.key);
  updateKeyButton();
  return true;
}

export function updateKeyButton() { $("key-button").textContent = state.key ? "API key ✓" : "API key"; }

const STATUS_WORDS = {
  401: "This server needs its API key", 404: "Not found", 409: "The store refused", 413: "Too large",
  415: "Not an image", 422: "The request cannot be run", 503: "The server is not ready",
};

// fetch() on the API; a refusal becomes a banner with the server's message and fix.
// An aborted request (a newer search replaced it) throws an AbortError and shows nothing.
export async function api(path, options = {}, retried = false) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.ok) return response;
  let body = { error: `the server answered ${response.status}`, fix: null };
  try { body = await response.json(); } catch (_) { /* not JSON: keep the status */ }
  if (response.status === 401 && !retried && askKey()) return api(path, options, true);
  if (!(options.signal && options.signal.aborted)) {
    const what = STATUS_WORDS[response.status] || `The server refused (${response.status})`;
    showError(`${what} (${response.status}): ${body.error}`, body.fix);
  }
  const error = new Error(body.error);
  error.status = response.status;
  throw error;
}

export function postJson(path, body, signal) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal });
}

export async function blobUrl(path, signal) {
  const response = await api(path, { signal });
  return URL.createObjectURL(await response.blob());
}

export function isAbort(error) { return error && error.name === "AbortError"; }

// -- words -------------------------------------------------------------------------------------

export function field(name) { return state.fields.find((f) => f.name === name); }

export function patientField() {
  return PATIENT_FIELDS.find((name) => field(name) && field(name).source === "metadata") || null;
}

export function label(name) {
  const words = { slide_id: "slide", patient_id: "patient", case_id: "case", mpp: "µm per pixel" };
  return words[name] || name.replace(/_/g, " ");
}

export function shown(value) {
  if (value === true) return "yes";
  if (value === false) return "no";
  if (typeof value === "number" && !Number.isInteger(value)) return String(Math.round(value * 100) / 100);
  return String(value);
}

// The metadata a pathologist reads (manifest columns), most useful first; and conchdb's own.
export function readable(payload) {
  const meta = state.fields.filter((f) => f.source === "metadata" && f.name in payload).map((f) => f.name);
  meta.sort(readingOrder);
  return meta.map((name) => [label(name), shown(payload[name])]);
}

// Field names in the order a pathologist reads them: patient, diagnosis, site, ..., then the rest by name.
export function readingOrder(a, b) {
  const rank = (name) => (READ_FIRST.includes(name) ? READ_FIRST.indexOf(name) : READ_FIRST.length);
  return rank(a) - rank(b) || a.localeCompare(b);
}

export function storage(payload) {
  const hidden = new Set(["path", "identity"]);
  const meta = new Set(state.fields.filter((f) => f.source === "metadata").map((f) => f.name));
  return Object.entries(payload).filter(([k]) => !meta.has(k) && !hidden.has(k)).map(([k, v]) => [k, shown(v)]);
}

// A tile's position as a pathologist measures it: micrometres from the slide's top left.
export function position(hit) {
  const mpp = hit.payload && hit.payload.mpp;
  if (!mpp) return `at pixel ${hit.x}, ${hit.y}`;
  const um = (v) => Math.round(v * mpp).toLocaleString("en");
  return `at ${um(hit.x)} µm, ${um(hit.y)} µm`;
}

export function score(value) { return value.toFixed(3); }

export function element(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && key !== "list") node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// A list of label: value pairs as a <dl>.
export function facts(pairs, className = "facts") {
  const list = element("dl", { class: className });
  for (const [name, value] of pairs) list.append(element("dt", {}, name), element("dd", {}, value));
  return list;
}
