// The store view: summary cards, the domains table, the pinning chart, the history; rollback and remove.
import { api, card, fmt, h, setStatus, state } from "./util.js";

export async function loadStore() {
  const data = await api("/ui/api/store");
  state.store = data;
  state.serial = data.serving.snapshot;
  renderStore(data);
  return data;
}

export function renderStore(data) {
  const s = data.store;
  const active = s.domains.filter((d) => d.status === "active");
  document.getElementById("store-title").textContent =
    `${s.condition} store on ${s.model.spec} · ${active.length} domain${active.length === 1 ? "" : "s"}`;
  document.getElementById("store-summary").replaceChildren(
    card("Condition", s.condition, `crma ${s.crma_version || "?"}`),
    card("Base model", s.model.spec, `${s.model.architecture || ""} ${fmt.short(s.model.fingerprint)}`),
    card("Backbone", s.backbone.current ? `v${s.backbone.current}` : "none",
      s.backbone.current ? `${s.backbone.versions.length} versions` : "frozen: adapters only"),
    card("Router", s.router.current ? `v${s.router.current}` : "none", `${s.router.versions.length} versions`),
    card("Updated", fmt.time(s.updated), `snapshot ${data.serving.snapshot}`),
  );
  renderDomains(data);
  renderPinning(s);
  renderTimeline(s);
}

// Every version of a domain: a full-width row under the domain's row, shown by its "versions" button.
function versionRow(d, id) {
  const rows = d.versions.map((v) => h("tr", {},
    h("td", {}, `v${v.version}${v.version === d.current ? " (serving)" : ""}`), h("td", {class: "nowrap"}, fmt.time(v.created)),
    h("td", {}, v.backbone_version ? `v${v.backbone_version}` : "–"), h("td", {class: "num"}, fmt.num(v.holdout_loss)),
    h("td", {class: "num"}, fmt.num(v.base_loss)), h("td", {class: "num"}, fmt.pct(v.gain_pct)),
    h("td", {class: "num"}, v.tasks ? `${fmt.num(v.tasks.score, 3)} (${fmt.num(v.tasks.base_score, 3)})` : "–"),
    h("td", {class: "num"}, fmt.int(v.data.train?.passages)), h("td", {class: "num"}, fmt.int(v.data.holdout?.passages)),
    h("td", {class: "mono", title: v.data.train?.sha256 || ""}, fmt.short(v.data.train?.sha256)),
    h("td", {class: "mono", title: v.files["adapter_model.safetensors"] || ""},
      fmt.short(v.files["adapter_model.safetensors"]))));
  const head = ["Version", "Created", "Backbone", "Holdout", "Base", "Gain", "Task (base)", "Train", "Holdout",
    "Train data sha256", "Adapter sha256"];
  return h("tr", {class: "versions-row", id, hidden: true},
    h("td", {colspan: 9}, h("table", {class: "inner", "aria-label": `Versions of ${d.name}`},
      h("thead", {}, h("tr", {}, head.map((t) => h("th", {scope: "col"}, t)))), h("tbody", {}, rows))));
}

function versionsButton(d, id) {
  const label = d.versions.map((v) => `v${v.version}`).join(", ");
  const button = h("button", {type: "button", class: "link", "aria-expanded": "false", "aria-controls": id,
    "aria-label": `Versions of ${d.name}: ${label}`}, `${label} ▸`);
  button.addEventListener("click", () => {
    const row = document.getElementById(id);
    row.hidden = !row.hidden;
    button.setAttribute("aria-expanded", String(!row.hidden));
    button.textContent = `${label} ${row.hidden ? "▸" : "▾"}`;
  });
  return button;
}

function renderDomains(data) {
  const tbody = document.querySelector("#domains tbody");
  const rows = data.store.domains.flatMap((d) => {
    const v = d.versions.find((x) => x.version === d.current) || d.versions[d.versions.length - 1];
    const removed = d.status !== "active";
    const earlier = d.versions.filter((x) => x.version < d.current);
    const train = v.data.train || {};
    const id = `versions-${d.name}`;
    const actions = removed ? h("span", {class: "muted"}, "removed") : h("div", {class: "actions"},
      h("button", {type: "button", class: "secondary", disabled: !data.admin || earlier.length === 0,
        title: !data.admin ? "start crma serve with an admin token to enable" : earlier.length ? "" : "no earlier version",
        "aria-label": `Roll back ${d.name}`, onclick: () => confirmChange("rollback", d, earlier)}, "Roll back"),
      h("button", {type: "button", class: "danger", disabled: !data.admin,
        title: data.admin ? "" : "start crma serve with an admin token to enable",
        "aria-label": `Remove ${d.name}`, onclick: () => confirmChange("remove", d)}, "Remove"));
    const main = h("tr", {class: removed ? "removed" : d.unavailable ? "unavailable" : "", "data-domain": d.name},
      h("th", {scope: "row"}, d.name, d.unavailable ? h("div", {class: "error"}, `unavailable: ${d.unavailable}`) : null),
      h("td", {}, removed ? "–" : `v${d.current}`),
      h("td", {}, versionsButton(d, id)),
      h("td", {}, v.backbone_version ? `v${v.backbone_version}` : "–"),
      h("td", {class: "nowrap"}, `${fmt.int(train.passages)} rec · ${fmt.int(train.tokens)} tok`),
      h("td", {class: "num nowrap"}, `${fmt.num(v.holdout_loss)} (${fmt.num(v.base_loss)})`),
      h("td", {class: "num"}, fmt.pct(v.gain_pct)),
      h("td", {class: "num nowrap"}, v.tasks ? `${fmt.num(v.tasks.score, 3)} (${fmt.num(v.tasks.base_score, 3)})` : "–"),
      h("td", {}, actions));
    return [main, versionRow(d, id)];
  });
  tbody.replaceChildren(...rows);
}

function renderPinning(s) {
  const fig = document.getElementById("pinning");
  const domains = s.domains.filter((d) => d.status === "active");
  const nb = s.backbone.versions.length;
  if (!nb) {
    fig.replaceChildren(h("p", {class: "muted"}, "This store has no backbone (every adapter sits on the base model)."));
    return;
  }
  const left = 120, top = 28, dx = Math.max(36, Math.min(80, 560 / nb)), dy = 30;
  const width = left + dx * nb + 20, height = top + dy * domains.length + 10;
  const svg = h("svg", {viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": "Adapter versions placed on the backbone versions they are pinned to"});
  s.backbone.versions.forEach((b, i) => {
    const x = left + dx * i + dx / 2;
    svg.append(h("text", {x, y: 16, class: "axis", "text-anchor": "middle"}, `bb v${b.version}`),
      h("line", {x1: x, x2: x, y1: 22, y2: height - 4, class: "grid"}));
  });
  domains.forEach((d, j) => {
    const y = top + dy * j + dy / 2;
    svg.append(h("text", {x: left - 10, y: y + 4, "text-anchor": "end", class: "label"}, d.name));
    d.versions.forEach((v) => {
      const i = s.backbone.versions.findIndex((b) => b.version === v.backbone_version);
      if (i < 0) return;
      const serving = v.version === d.current;
      svg.append(h("circle", {cx: left + dx * i + dx / 2, cy: y, r: serving ? 8 : 6, class: serving ? "dot on" : "dot"},
        h("title", {}, `${d.name} v${v.version} on backbone v${v.backbone_version}${serving ? " (serving)" : ""}`)));
    });
  });
  fig.replaceChildren(svg);
}

function describeEvent(e) {
  const what = {add: `added ${e.domain} v${e.version}`, rollback: `rolled ${e.domain} back to v${e.version}`,
    remove: `removed ${e.domain}`}[e.op] || `${e.op} ${e.domain || e.part || ""}`;
  return what + (e.backbone_version ? ` · backbone v${e.backbone_version}` : "")
    + (e.router_version ? ` · router v${e.router_version}` : "");
}

function renderTimeline(s) {
  const items = [...s.log].reverse().map((e) => h("li", {class: `event ${e.op}`},
    h("time", {datetime: e.time}, fmt.time(e.time)), " ", h("span", {}, describeEvent(e))));
  document.getElementById("timeline").replaceChildren(...items);
}

// Rollback and remove: a confirmation dialog that asks for the admin token; nothing is kept.
function confirmChange(action, d, earlier = []) {
  const dlg = document.getElementById("confirm");
  const target = earlier.length ? earlier[earlier.length - 1].version : null;
  document.getElementById("confirm-title").textContent = action === "rollback" ? `Roll back ${d.name}` : `Remove ${d.name}`;
  document.getElementById("confirm-text").textContent = action === "rollback"
    ? `Serve ${d.name} v${target} instead of v${d.current}? The router's statistics go back to those of v${target}.`
    : `Stop serving ${d.name}? Its versions stay on disk; adding it again starts a new version.`;
  const token = document.getElementById("admin-token");
  const error = document.getElementById("confirm-error");
  token.value = "";
  error.textContent = "";
  const form = document.getElementById("confirm-form");
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    try {
      const body = action === "rollback" ? {domain: d.name, to: target} : {domain: d.name};
      await api(`/admin/${action}`, {method: "POST", body, token: token.value});
      token.value = "";
      dlg.close();
      setStatus(action === "rollback" ? `${d.name}: now serving v${target}` : `${d.name}: removed`);
      await loadStore();
    } catch (err) {
      error.textContent = `Refused: ${err.message}`;
    }
  };
  document.getElementById("confirm-cancel").onclick = () => dlg.close();
  dlg.showModal();
  token.focus();
}
