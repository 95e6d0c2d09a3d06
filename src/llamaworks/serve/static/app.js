// llamaworks chat page: plain JS, no build step. Talks to the server's OpenAI-compatible API.
"use strict";

const CHAT_KEY = "llamaworks.chat.v1";
const SETTINGS_KEY = "llamaworks.settings.v1";
const $ = (id) => document.getElementById(id);

const state = {
  model: null,
  messages: [],        // [{role, content}] without the system prompt (it lives in the settings)
  controller: null,    // AbortController of the reply being streamed
  composing: false,    // an IME composition (Korean, Japanese, Chinese) is in progress
};

// ---- safe markdown ---------------------------------------------------------------------------
// Everything is HTML-escaped first; only the few tags below are ever produced, so model output can
// never inject markup or script.
function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function renderInline(escaped) {
  return escaped.split(/(`[^`\n]+`)/).map((part) => {
    if (part.length > 1 && part.startsWith("`") && part.endsWith("`")) {
      return "<code>" + part.slice(1, -1) + "</code>";
    }
    return part
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  }).join("");
}

function renderMarkdown(source) {
  const lines = source.split("\n");
  const out = [];
  let paragraph = [];
  let list = null; // {tag, items}
  const flushParagraph = () => {
    if (paragraph.length) out.push("<p>" + paragraph.map(renderInline).join("<br>") + "</p>");
    paragraph = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>` + list.items.map((i) => "<li>" + renderInline(i) + "</li>").join("") +
      `</${list.tag}>`);
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+.#-]*)/);
    if (fence) {
      flushParagraph(); flushList();
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```/.test(lines[i])) code.push(lines[i++]);
      // An unclosed fence (still streaming) is rendered as code all the same.
      const lang = fence[1] ? `<span class="lang">${escapeHtml(fence[1])}</span>` : "";
      out.push(`<pre>${lang}<code>${escapeHtml(code.join("\n"))}</code></pre>`);
      continue;
    }
    const escaped = escapeHtml(line);
    const heading = escaped.match(/^(#{1,6})\s+(.*)$/);
    const bullet = escaped.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = escaped.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flushParagraph(); flushList();
      const level = heading[1].length;
      out.push(`<h${level}>${renderInline(heading[2])}</h${level}>`);
    } else if (bullet || numbered) {
      flushParagraph();
      const tag = bullet ? "ul" : "ol";
      if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
      list.items.push((bullet || numbered)[1]);
    } else if (!line.trim()) {
      flushParagraph(); flushList();
    } else {
      flushList();
      paragraph.push(escaped);
    }
  }
  flushParagraph(); flushList();
  return out.join("");
}

// ---- storage -----------------------------------------------------------------------------------
function loadJSON(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}

function saveChat() {
  localStorage.setItem(CHAT_KEY, JSON.stringify(state.messages));
}

const SETTING_FIELDS = ["system-prompt", "temperature", "top-p", "max-tokens", "seed", "api-key"];

function saveSettings() {
  const settings = {};
  for (const id of SETTING_FIELDS) settings[id] = $(id).value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
  $("temperature-value").textContent = $("temperature").value;
  $("top-p-value").textContent = $("top-p").value;
}

function loadSettings() {
  const settings = loadJSON(SETTINGS_KEY, {});
  for (const id of SETTING_FIELDS) if (settings[id] !== undefined) $(id).value = settings[id];
  saveSettings();
}

// ---- rendering -----------------------------------------------------------------------------------
function addMessageElement(role, content) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.dataset.role = role;
  const body = document.createElement("div");
  body.className = "content";
  el.append(body);
  setContent(el, role, content);
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function setContent(el, role, content) {
  const body = el.querySelector(".content");
  if (role === "assistant") body.innerHTML = renderMarkdown(content);
  else body.textContent = content;
}

function renderAll() {
  $("messages").replaceChildren();
  for (const m of state.messages) addMessageElement(m.role, m.content);
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// ---- talking to the server -----------------------------------------------------------------------
async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error?.message || resp.statusText);
    state.model = data.data[0].id;
    $("model-name").textContent = state.model;
    showError("");
  } catch (err) {
    $("model-name").textContent = "not connected";
    showError("Could not list models: " + err.message);
  }
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.messages);
  const body = {
    model: state.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value) || 512,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

// Read a server-sent-event stream, calling onData with each parsed `data:` JSON object.
async function readSSE(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  if (!state.model) await loadModel();
  if (!state.model) return;
  showError("");
  $("input").value = "";
  state.messages.push({ role: "user", content: text });
  saveChat();
  addMessageElement("user", text);

  const reply = { role: "assistant", content: "" };
  const el = addMessageElement("assistant", "");
  el.dataset.streaming = "true";
  el.dataset.chunks = "0";
  state.controller = new AbortController();
  setBusy(true);
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal,
    });
    if (!resp.ok) {
      const data = await resp.json().catch(() => ({}));
      throw new Error(data.error?.message || `HTTP ${resp.status}`);
    }
    await readSSE(resp, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices?.[0]?.delta;
      if (delta?.content) {
        reply.content += delta.content;
        el.dataset.chunks = String(Number(el.dataset.chunks) + 1);
        setContent(el, "assistant", reply.content);
        el.scrollIntoView({ block: "end" });
      }
      if (chunk.usage) el.title = `${chunk.usage.prompt_tokens} prompt + ${chunk.usage.completion_tokens} reply tokens`;
    });
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    el.dataset.streaming = "false";
    state.controller = null;
    setBusy(false);
    if (reply.content) {
      state.messages.push(reply);
    } else {
      el.remove();
    }
    saveChat();
    $("input").focus();
  }
}

// ---- wiring -------------------------------------------------------------------------------------
function init() {
  loadSettings();
  state.messages = loadJSON(CHAT_KEY, []);
  renderAll();
  for (const id of SETTING_FIELDS) $(id).addEventListener("input", saveSettings);
  $("api-key").addEventListener("change", loadModel);
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", () => {
    state.controller?.abort();
    state.messages = [];
    saveChat();
    renderAll();
  });
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
  const input = $("input");
  input.addEventListener("compositionstart", () => { state.composing = true; });
  // Some browsers send the Enter that commits a composition after compositionend: clear the flag late.
  input.addEventListener("compositionend", () => { setTimeout(() => { state.composing = false; }, 0); });
  input.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.shiftKey) return;
    // Enter while an IME is composing (e.g. Korean 한글) commits the syllable; it must not send.
    if (e.isComposing || e.keyCode === 229 || state.composing) return;
    e.preventDefault();
    send();
  });
  loadModel();
  input.focus();
}

init();
