// The chat page of `simone serve`: the conversation lives in this page (`history`), and each
// reply streams from /v1/chat/completions. Whatever the model or the server says is set as
// textContent, never parsed as HTML. A reply stopped early stays in the history as far as it
// was shown; a request that fails leaves the history as it was and gives the text back.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // [{role, content}], sent with every request (the system message is added then)
let model = null; // the id the server serves (GET /v1/models)
let controller = null; // aborts the reply being streamed
let conversation = 0; // counts "New chat": a reply still ending after one joins no history

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function say(text) {
  $("status").textContent = text;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorOf(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) throw new Error("this server needs its API key: enter it under Settings");
  if (!r.ok) throw new Error(await errorOf(r));
  const card = (await r.json()).data[0];
  model = card.id;
  $("model").textContent = `${card.id} · ${card.chat_format} chat · context ${card.context_window} tokens`;
  say("");
}

// Server-sent events of one streamed reply: `onChunk` gets each JSON chunk.
async function readEvents(response, onChunk) {
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
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      onChunk(chunk);
    }
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history, { role: "user", content: text });
  const asked = { model, messages, stream: true, temperature: Number($("temperature").value) };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) asked.max_tokens = maxTokens;
  const current = conversation;
  const mine = bubble("user", text);
  const reply = bubble("assistant", "");
  reply.classList.add("streaming");
  controller = new AbortController();
  busy(true);
  say("");
  let said = "";
  let finish = null;
  try {
    if (!model) {
      await loadModel();
      asked.model = model;
    }
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(asked), signal: controller.signal,
    });
    if (!r.ok) throw new Error(r.status === 401 ? "this server needs its API key: enter it under Settings" : await errorOf(r));
    await readEvents(r, (chunk) => {
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          said += choice.delta.content;
          reply.textContent = said;
          reply.scrollIntoView({ block: "end" });
        }
        finish = choice.finish_reason || finish;
      }
    });
    say(finish === "length" ? "the reply reached max tokens" : "");
  } catch (e) {
    if (e.name !== "AbortError") {
      mine.remove();
      reply.remove();
      if (!$("input").value) $("input").value = text;
      say("error: " + e.message);
      return;
    }
    say("stopped");
  } finally {
    reply.classList.remove("streaming");
    controller = null;
    busy(false);
  }
  if (current === conversation) history.push({ role: "user", content: text }, { role: "assistant", content: said });
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation += 1;
  history.length = 0;
  $("log").replaceChildren();
  say("");
  $("input").focus();
});
$("settings-btn").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-btn").setAttribute("aria-expanded", String(!panel.hidden));
});
$("api-key").addEventListener("change", () => {
  model = null;
  loadModel().catch((e) => say(e.message));
});
loadModel().catch((e) => say(e.message));
