// The filter form, built from the data: GET /v1/fields gives each field's stored values with
// their counts (offered as choices: values match exactly, case included) or its range (numbers).

import { $, element, label, readingOrder, shown, state } from "./core.js";

const FEW = 12; // up to this many values show as checkboxes; more as a searchable list

// The fields a pathologist filters by: the slides' own metadata (manifest columns).
export function filterFields() {
  return state.fields.filter((f) => f.source === "metadata").sort((a, b) => readingOrder(a.name, b.name));
}

function countText(value) {
  if (value.slides !== null && value.slides !== undefined) return `${value.slides} slide${value.slides === 1 ? "" : "s"}`;
  return `${value.tiles} tiles`;
}

export function buildFilters(onChange) {
  const form = $("filters");
  form.replaceChildren();
  for (const f of filterFields()) {
    const id = `filter-${f.name}`;
    if (f.type === "bool") {
      const select = element("select", { id, name: f.name });
      select.add(new Option("any", ""));
      for (const [value, text] of [["true", "yes"], ["false", "no"]]) {
        const found = (f.values || []).find((v) => String(v.value) === value);
        select.add(new Option(found ? `${text} (${countText(found)})` : text, value));
      }
      form.append(element("div", { class: "filter" }, element("label", { for: id }, label(f.name)), select));
    } else if (f.type === "integer" || f.type === "float") {
      const step = f.type === "integer" ? "1" : "any";
      const range = (f.min !== null && f.max !== null) ? `${shown(f.min)} to ${shown(f.max)}` : "";
      const min = element("input", { id: `${id}-min`, name: `${f.name}.min`, type: "number", step, placeholder: "from" });
      const max = element("input", { id: `${id}-max`, name: `${f.name}.max`, type: "number", step, placeholder: "to" });
      const problem = element("span", { class: "problem", id: `${id}-problem`, role: "alert" });
      const group = element("fieldset", { class: "filter range" },
        element("legend", {}, label(f.name), range ? element("span", { class: "muted small" }, ` (stored: ${range})`) : null),
        element("label", { for: min.id, class: "sr-only" }, `${label(f.name)} from`), min,
        element("label", { for: max.id, class: "sr-only" }, `${label(f.name)} to`), max, problem);
      form.append(group);
    } else if (f.values && f.values.length && f.values.length <= FEW) {
      const group = element("fieldset", { class: "filter choices", id });
      group.append(element("legend", {}, label(f.name)));
      for (const value of f.values) {
        const box = element("input", { type: "checkbox", name: f.name, value: String(value.value) });
        group.append(element("label", { class: "choice" }, box, ` ${value.value} `,
          element("span", { class: "muted small" }, `(${countText(value)})`)));
      }
      form.append(group);
    } else {
      // Many (or unlisted) values: a text entry with the stored values to pick from.
      const list = element("datalist", { id: `${id}-values` });
      for (const value of f.values || []) list.append(element("option", { value: String(value.value) }, countText(value)));
      const input = element("input", { id, name: f.name, placeholder: "any (exact value)", list: `${id}-values` });
      input.setAttribute("list", `${id}-values`);
      form.append(element("div", { class: "filter" }, element("label", { for: id }, label(f.name)), input, list));
    }
  }
  form.addEventListener("change", () => onChange());
  form.addEventListener("submit", (event) => { event.preventDefault(); onChange(); });
}

// The filters as the API takes them; null (and the form says why) when a range is impossible.
export function readFilters() {
  const form = $("filters");
  const out = {};
  let ok = true;
  for (const f of filterFields()) {
    if (f.type === "bool") {
      const value = form.elements[f.name].value;
      if (value) out[f.name] = value === "true";
    } else if (f.type === "integer" || f.type === "float") {
      const minInput = form.elements[`${f.name}.min`], maxInput = form.elements[`${f.name}.max`];
      const problem = $(`filter-${f.name}-problem`);
      const rule = {};
      if (minInput.value !== "") rule.gte = Number(minInput.value);
      if (maxInput.value !== "") rule.lte = Number(maxInput.value);
      const wrong = "gte" in rule && "lte" in rule && rule.gte > rule.lte;
      const message = wrong ? `“from” (${rule.gte}) is above “to” (${rule.lte}): swap them or clear one` : "";
      minInput.setCustomValidity(message);
      minInput.setAttribute("aria-invalid", wrong ? "true" : "false");
      problem.textContent = message;
      if (wrong) ok = false;
      else if (Object.keys(rule).length) out[f.name] = rule;
    } else if (f.values && f.values.length && f.values.length <= FEW) {
      const checked = [...form.querySelectorAll(`input[type=checkbox][name="${CSS.escape(f.name)}"]:checked`)];
      const values = checked.map((box) => f.values.find((v) => String(v.value) === box.value).value);
      if (values.length) out[f.name] = { in: values };
    } else {
      const text = form.elements[f.name].value.trim();
      if (text) out[f.name] = f.type === "integer" ? Number(text) : text;
    }
  }
  return ok ? out : null;
}

// Put filters (from a URL) back into the form.
export function writeFilters(filters) {
  const form = $("filters");
  form.reset();
  for (const f of filterFields()) {
    const rule = filters[f.name];
    if (rule === undefined || rule === null) continue; // a link may hold anything: the server says what is wrong
    if (f.type === "bool") form.elements[f.name].value = String(rule);
    else if (f.type === "integer" || f.type === "float") {
      const range = typeof rule === "object" ? rule : { gte: rule, lte: rule };
      if (range.gte !== undefined) form.elements[`${f.name}.min`].value = range.gte;
      if (range.lte !== undefined) form.elements[`${f.name}.max`].value = range.lte;
    } else if (f.values && f.values.length && f.values.length <= FEW) {
      const wanted = new Set((rule && rule.in ? rule.in : [rule]).map(String));
      for (const box of form.querySelectorAll(`input[type=checkbox][name="${CSS.escape(f.name)}"]`)) box.checked = wanted.has(box.value);
    } else form.elements[f.name].value = String(rule && rule.in ? rule.in[0] : rule);
  }
}

// Slide records carry the manifest columns, so the slide browser filters by the same fields.
export function describeFilters(filters) {
  const parts = Object.entries(filters).map(([name, rule]) => {
    if (rule && typeof rule === "object" && "in" in rule) return `${label(name)}: ${rule.in.map(shown).join(" or ")}`;
    if (rule && typeof rule === "object") {
      return `${label(name)} ${"gte" in rule ? `≥ ${rule.gte}` : ""}${"gte" in rule && "lte" in rule ? " and " : ""}${"lte" in rule ? `≤ ${rule.lte}` : ""}`;
    }
    return `${label(name)}: ${shown(rule)}`;
  });
  return parts.join("; ");
}
