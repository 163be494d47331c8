// Shared helpers of the console: building elements safely, calling the server, formatting numbers.

export const state = {
  key: sessionStorage.getItem("crma-key") || "",   // API key (only when the server has keys)
  store: null,            // /ui/api/store
  serial: null,           // the served snapshot; a change means the store changed
  onLogin: null,          // what to run again after signing in
};

// h("td", {class: "num"}, "1.23") -> <td class="num">1.23</td>; children are text unless they are nodes.
export function h(tag, attrs = {}, ...children) {
  const svg = ["svg", "circle", "line", "text", "polyline", "rect", "title", "g"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// A summary card: a label, a value, an optional note.
export function card(label, value, note) {
  return h("div", {class: "card"}, h("div", {class: "label"}, label), h("div", {class: "value"}, value),
    note ? h("div", {class: "muted"}, note) : null);
}

// A labelled horizontal bar (role meter): value out of max, the text shown beside it.
export function bar(label, value, max, text, cls = "") {
  const fill = h("div", {class: `fill ${cls}`});
  fill.style.width = `${Math.max(0, Math.min(1, value / (max || 1))) * 100}%`;
  return h("div", {class: "bar-row"}, h("span", {class: "bar-label"}, label),
    h("div", {class: "bar", role: "meter", "aria-label": label, "aria-valuemin": 0, "aria-valuemax": max,
      "aria-valuenow": value}, fill), h("span", {class: "num"}, text));
}

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// fetch with the API key; JSON in and out; 401 opens the sign-in dialog.
export async function api(path, {method = "GET", body, token, raw = false} = {}) {
  const headers = {};
  const bearer = token !== undefined ? token : state.key;
  if (bearer) headers["Authorization"] = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  if (raw && res.ok) return res;
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try { message = (await res.json()).error?.message || message; } catch (_) { /* not JSON */ }
    if (res.status === 401 && token === undefined) showLogin(message);
    throw new ApiError(res.status, message);
  }
  return res.json();
}

export function showLogin(message) {
  const dlg = document.getElementById("login");
  document.getElementById("login-error").textContent = state.key ? message : "";
  if (!dlg.open) dlg.showModal();
}

export function setStatus(text, isError = false) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

export const fmt = {
  num: (x, d = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(d)),
  pct: (x) => (x === null || x === undefined ? "–" : `${x >= 0 ? "+" : ""}${Number(x).toFixed(2)}%`),
  int: (x) => (x === null || x === undefined ? "–" : Math.round(x).toLocaleString("en")),
  time: (iso) => {                                     // any ISO 8601 time -> "YYYY-MM-DD HH:MM:SS UTC"
    const t = iso ? new Date(iso) : null;
    return t && !Number.isNaN(t.getTime()) ? `${t.toISOString().slice(0, 19).replace("T", " ")} UTC` : "–";
  },
  secs: (x) => (x === null || x === undefined ? "–" : x < 1 ? `${Math.round(x * 1000)} ms` : `${x.toFixed(2)} s`),
  short: (sha) => (sha ? sha.slice(0, 12) : "–"),
};

// The model names the server answers for, in a select: auto first, then domains, versions, base.
export function fillModels(select, models, keep) {
  const previous = keep || select.value;
  select.replaceChildren(...models.map((m) => h("option", {value: m}, m)));
  if (models.includes(previous)) select.value = previous;
}
