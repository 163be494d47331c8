// The router view: every domain's probability for a typed query, the background class, the decision and why;
// recent decisions from the routing log.
import { api, bar, fmt, h, state } from "./util.js";

async function route(ev) {
  ev.preventDefault();
  const text = document.getElementById("route-text").value;
  const out = document.getElementById("route-result");
  out.replaceChildren(h("p", {class: "muted"}, "routing…"));
  try {
    const r = await api("/ui/api/route", {method: "POST", body: {text}});
    const decided = r.decision === "base"
      ? `base model: the router abstained (${r.reason}): ${r.why}`
      : `${r.decision}: ${r.why}`;
    out.replaceChildren(
      h("p", {class: "decision"}, h("strong", {}, "Decision: "), h("span", {id: "route-decision"}, decided)),
      h("p", {class: "muted"}, `best ${r.best || "–"} (confidence ${fmt.num(r.confidence, 3)}), runner-up `
        + `${r.runner_up || "–"} (${fmt.num(r.runner_up_confidence, 3)}); distance ratio ${fmt.num(r.ood_ratio, 2)} `
        + `(above 1: too far); router v${r.router_version}`),
      h("div", {class: "bars", "aria-label": "Router probabilities"},
        ...r.domains.map((d) => bar(d.domain, d.probability, 1, d.probability.toFixed(3),
          d.domain === r.decision ? "chosen" : "")),
        bar("background", r.background || 0, 1, (r.background || 0).toFixed(3), "background")));
  } catch (err) {
    out.replaceChildren(h("p", {class: "error"}, err.message));
  }
}

export async function loadRouteLog() {
  const box = document.getElementById("route-log");
  if (!state.store?.route_log) {
    box.replaceChildren(h("p", {class: "muted"}, "No routing log: start crma serve with --route-log FILE to see "
      + "the router's recent decisions here."));
    return;
  }
  const {records} = await api("/ui/api/route-log?n=30");
  if (!records.length) {
    box.replaceChildren(h("p", {class: "muted"}, "No requests yet."));
    return;
  }
  const rows = records.map((r) => h("tr", {}, h("td", {}, fmt.time(r.time)), h("td", {}, r.model),
    h("td", {}, r.domain || "–"), h("td", {class: "num"}, fmt.num(r.confidence, 2)), h("td", {}, r.runner_up || "–"),
    h("td", {}, r.reason || ""), h("td", {class: "num"}, fmt.secs(r.ttft_s)), h("td", {}, r.status)));
  box.replaceChildren(h("div", {class: "table-wrap"}, h("table", {"aria-label": "Recent routing decisions"},
    h("thead", {}, h("tr", {}, ["Time", "Asked", "Served", "Confidence", "Runner-up", "Abstained", "First token",
      "Status"].map((t) => h("th", {scope: "col"}, t)))), h("tbody", {}, rows))));
}

export function initRouter() {
  document.getElementById("route-form").addEventListener("submit", route);
  document.getElementById("route-text").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) route(ev);
  });
}
