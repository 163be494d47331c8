// The console's entry point: tabs, signing in, and the poll that keeps every view current.
import { initChat, setModels } from "./chat.js";
import { loadResults, renderLive } from "./live.js";
import { initRouter, loadRouteLog } from "./router.js";
import { loadStore } from "./store.js";
import { api, setStatus, state } from "./util.js";

const POLL_MS = 2000;
const tabs = () => [...document.querySelectorAll('[role="tab"]')].filter((t) => !t.hidden);

function select(tab, focus = true) {
  for (const t of tabs()) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
  location.hash = tab.id.replace("tab-", "");
  if (tab.id === "tab-router") loadRouteLog().catch(() => {});
  if (tab.id === "tab-results") loadResults();
}

function initTabs() {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    t.addEventListener("click", () => select(t));
    t.addEventListener("keydown", (ev) => {          // arrow keys move between tabs (WAI-ARIA tabs pattern)
      const all = tabs();
      const i = all.indexOf(t);
      const next = {ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: all.length - 1}[ev.key];
      if (next === undefined) return;
      ev.preventDefault();
      select(all[(next + all.length) % all.length]);
    });
  }
}

function initLogin() {
  document.getElementById("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    state.key = document.getElementById("api-key").value.trim();
    sessionStorage.setItem("crma-key", state.key);
    document.getElementById("login").close();
    await start();
  });
}

async function refreshModels(serving) {
  setModels(serving.models);
}

let timer = null;

async function poll() {
  try {
    const live = await api("/ui/api/live");
    renderLive(live);
    if (live.serving.snapshot !== state.serial) {         // crma add, rollback, remove: a new manifest is served
      const before = state.serial;
      await loadStore();
      await refreshModels(live.serving);
      if (before !== null) setStatus(`store updated (snapshot ${live.serving.snapshot})`);
      if (!document.getElementById("view-router").hidden) loadRouteLog().catch(() => {});
    }
  } catch (err) {
    if (err.status !== 401) setStatus(`server unreachable: ${err.message}`, true);
  }
  timer = setTimeout(poll, POLL_MS);
}

async function start() {
  clearTimeout(timer);
  try {
    const data = await loadStore();
    await refreshModels(data.serving);
    document.getElementById("tab-results").hidden = !data.results;
    setStatus("");
  } catch (err) {
    if (err.status !== 401) setStatus(err.message, true);
    return;
  }
  const wanted = document.getElementById(`tab-${location.hash.slice(1)}`);
  if (wanted && !wanted.hidden) select(wanted, false);
  poll();
}

initTabs();
initLogin();
initChat();
initRouter();
start();
