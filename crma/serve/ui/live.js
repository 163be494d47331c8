// The live view (the /metrics counters, polled) and the results view (crma report's tables and plots).
import { api, bar, card, fmt, h } from "./util.js";

const history = [];           // [{t, generated}] of the last polls
const KEEP = 60;

function rate() {
  if (history.length < 2) return 0;
  const a = history[history.length - 2], b = history[history.length - 1];
  return Math.max(0, (b.generated - a.generated) / Math.max(1e-3, (b.t - a.t) / 1000));
}

function sparkline() {
  const rates = history.slice(1).map((b, i) => Math.max(0, (b.generated - history[i].generated)
    / Math.max(1e-3, (b.t - history[i].t) / 1000)));
  if (!rates.some((r) => r > 0)) return h("p", {class: "muted"}, "No tokens generated since this page opened.");
  const w = 600, ht = 80, top = Math.max(1, ...rates);
  const slots = KEEP - 2, first = slots - (rates.length - 1);           // the newest point on the right edge
  const pts = rates.map((r, i) => `${((first + i) / slots) * w},${ht - (r / top) * (ht - 8) - 4}`).join(" ");
  return [h("svg", {viewBox: `0 0 ${w} ${ht}`, width: "100%", height: ht, preserveAspectRatio: "none", role: "img",
    "aria-label": `tokens per second over the last two minutes, peak ${top.toFixed(1)}`},
  h("polyline", {points: pts, class: "spark", "vector-effect": "non-scaling-stroke"})),
  h("figcaption", {class: "muted"}, `peak ${top.toFixed(1)} tokens/s; one point per poll (2 s), newest on the right`)];
}

export function renderLive(data) {
  const m = data.metrics;
  history.push({t: performance.now(), generated: m.generated_tokens});
  if (history.length > KEEP) history.shift();
  const ok = Object.entries(m.by_status).filter(([s]) => s === "200").reduce((a, [, n]) => a + n, 0);
  document.getElementById("live-cards").replaceChildren(
    card("Requests", fmt.int(m.requests), `${fmt.int(ok)} answered`),
    card("Tokens / s", rate().toFixed(1), `${fmt.int(m.generated_tokens)} generated in all`),
    card("Queue", fmt.int(data.queued), `${fmt.int(data.active)} rows decoding`),
    card("First token p50", fmt.secs(m.ttft.p50), `p90 ${fmt.secs(m.ttft.p90)} · mean ${fmt.secs(m.ttft.mean)}`),
    card("Reloads", fmt.int((m.reloads.ok || 0) + (m.reloads.refused || 0)), `${fmt.int(m.reloads.refused || 0)} refused`
      + ` · snapshot ${data.serving.snapshot}`),
  );
  document.getElementById("live-spark").replaceChildren(...[sparkline()].flat());
  const domains = Object.entries(m.by_domain).filter(([d]) => d !== "-").sort((a, b) => b[1] - a[1]);
  const top = Math.max(1, ...domains.map(([, n]) => n));
  document.getElementById("live-domains").replaceChildren(domains.length
    ? h("div", {class: "bars"}, ...domains.map(([d, n]) => bar(d, n, top, fmt.int(n))))
    : h("p", {class: "muted"}, "No requests yet."));
}

export async function loadResults() {
  const box = document.getElementById("results");
  try {
    const r = await api("/ui/api/results");
    const doc = new DOMParser().parseFromString(r.html, "text/html");   // markdown-it's HTML, raw HTML off
    box.replaceChildren(h("p", {class: "muted"}, `results folder ${r.folder}`), ...doc.body.childNodes);
    for (const table of box.querySelectorAll("table")) table.replaceWith(h("div", {class: "table-wrap"}, table.cloneNode(true)));
  } catch (err) {
    box.replaceChildren(h("p", {class: "error"}, err.message));
  }
}
