// The playground: chat with a model (auto, a domain, DOMAIN@vK, base), streamed; optionally two side by side.
import { api, fillModels, fmt, h, setStatus, state } from "./util.js";

const histories = {a: [], b: []};
let busy = false;

export function setModels(models) {
  const order = (m) => (m === "auto" ? 0 : m === "base" ? 3 : m.includes("@") ? 2 : 1);
  const sorted = [...models].sort((x, y) => order(x) - order(y) || x.localeCompare(y));
  fillModels(document.getElementById("model-a"), sorted);
  fillModels(document.getElementById("model-b"), sorted, document.getElementById("model-b").value || "base");
}

function served(info) {
  if (!info) return "";
  const parts = [];
  if (info.domain === "base") {
    parts.push(info.requested === "auto" ? `base (router abstained${info.reason ? `: ${info.reason}` : ""})` : "base");
  } else {
    parts.push(`${info.domain} v${info.adapter_version}`);
  }
  if (info.backbone_version) parts.push(`backbone v${info.backbone_version}`);
  if (info.requested === "auto" && info.confidence !== null && info.confidence !== undefined) {
    parts.push(`confidence ${fmt.num(info.confidence, 2)}`);
    if (info.runner_up) parts.push(`runner-up ${info.runner_up}`);
  }
  return parts.join(" · ");
}

// One streamed chat completion into `bubble`; resolves to the answer text.
async function stream(model, messages, bubble, meta) {
  const body = {model, messages, stream: true,
    max_tokens: Number(document.getElementById("max-tokens").value) || 128,
    temperature: Number(document.getElementById("temperature").value) || 0};
  const res = await api("/v1/chat/completions", {method: "POST", body, raw: true});
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", finish = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.crma) meta.textContent = served(chunk.crma);
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) {
        text += choice.delta.content;
        bubble.textContent = text;
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
    }
  }
  bubble.classList.remove("pending");
  if (finish === "length") meta.textContent += " · cut at max tokens";
  return text;
}

async function ask(side, model, prompt) {
  const pane = document.getElementById(`pane-${side}`);
  histories[side].push({role: "user", content: prompt});
  pane.append(h("div", {class: "msg user"}, h("div", {class: "who"}, "you"), h("div", {class: "text"}, prompt)));
  const bubble = h("div", {class: "text pending"}, "…");
  const meta = h("div", {class: "meta"}, `asking ${model}…`);
  pane.append(h("div", {class: "msg assistant", "data-model": model}, h("div", {class: "who"}, model), bubble, meta));
  pane.scrollTop = pane.scrollHeight;
  try {
    const answer = await stream(model, histories[side], bubble, meta);
    histories[side].push({role: "assistant", content: answer});
  } catch (err) {
    bubble.classList.remove("pending");
    bubble.textContent = "";
    meta.textContent = `error: ${err.message}`;
    meta.classList.add("error");
    histories[side].pop();
  }
  pane.scrollTop = pane.scrollHeight;
}

async function send(ev) {
  ev?.preventDefault();
  const input = document.getElementById("prompt");
  const prompt = input.value.trim();
  if (!prompt || busy) return;
  busy = true;
  document.getElementById("send").disabled = true;
  input.value = "";
  const compare = document.getElementById("compare").checked;
  const jobs = [ask("a", document.getElementById("model-a").value, prompt)];
  if (compare) jobs.push(ask("b", document.getElementById("model-b").value, prompt));
  setStatus(compare ? "two answers streaming…" : "streaming…");
  await Promise.all(jobs);
  setStatus("");
  busy = false;
  document.getElementById("send").disabled = false;
  input.focus();
}

function clear() {
  histories.a = [];
  histories.b = [];
  document.getElementById("pane-a").replaceChildren();
  document.getElementById("pane-b").replaceChildren();
}

export function initChat() {
  document.getElementById("prompt-form").addEventListener("submit", send);
  document.getElementById("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) send(ev);
  });
  document.getElementById("new-chat").addEventListener("click", clear);
  document.getElementById("chat-form").addEventListener("submit", (ev) => ev.preventDefault());
  const compare = document.getElementById("compare");
  compare.addEventListener("change", () => {
    document.getElementById("model-b-field").hidden = !compare.checked;
    document.getElementById("pane-b").hidden = !compare.checked;
    document.getElementById("panes").classList.toggle("two", compare.checked);
  });
  for (const id of ["model-a", "model-b"]) document.getElementById(id).addEventListener("change", clear);
  void state;
}
