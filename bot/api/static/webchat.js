// The chat page: the conversation lives in this tab and is the context sent with
// each question; answers stream from the API; base, finetuned or both side by side.
// With several adapters served, a picker chooses which one answers as "Finetuned".

import { ApiFailure, apiToken, engineStatus, sendFeedback, servedModels, streamChat } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const VARIANTS = ["base", "finetuned"];
const LABELS = { base: "Base", finetuned: "Finetuned" };
const NOTES = {
  length: "Cut at the answer length limit.",
  cancelled: "Stopped: the server is restarting, ask again in a minute.",
};
// Context sent with a question, oldest exchanges dropped first; the server trims
// again, exactly, in tokens. This keeps long chats under its request size limit.
const CONTEXT_CHARS = 16000;
const NEEDS_TOKEN = "This server needs its API token (API_TOKEN). It is kept for this tab only.";

const byId = (id) => document.getElementById(id);
const ui = {
  transcript: byId("transcript"),
  notice: byId("notice"),
  askForm: byId("ask-form"),
  question: byId("question"),
  send: byId("send"),
  tokenForm: byId("token-form"),
  token: byId("token"),
  tokenMessage: byId("token-message"),
  newChat: byId("new-chat"),
  adapterPicker: byId("adapter-picker"),
  adapter: byId("adapter"),
};
const feedbackOn = document.body.dataset.feedback === "on";

/** Every turn of this chat: `{question, models: {variant: model}, answers: {variant: {text, id, ok}}}`. */
let turns = [];
/** The AbortControllers of the answers being streamed. */
const inFlight = new Set();

function element(tag, className = "", text = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

function currentMode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

/** The chat so far as `variant` sees it: its own earlier answer where it gave one, else the other. */
function contextFor(variant, earlier) {
  const messages = [];
  for (const turn of earlier) {
    const answer = [turn.answers[variant], ...Object.values(turn.answers)].find((a) => a?.ok);
    if (answer) {
      messages.push({ role: "user", content: turn.question }, { role: "assistant", content: answer.text });
    }
  }
  let keep = messages.length;
  for (let i = messages.length - 2, size = 0; i >= 0; i -= 2) {
    size += messages[i].content.length + messages[i + 1].content.length;
    if (size > CONTEXT_CHARS) break;
    keep = i;
  }
  return messages.slice(keep);
}

/** The model the "finetuned" side asks: the picked adapter, or the default one. */
function finetunedModel() {
  return ui.adapterPicker.hidden || !ui.adapter.value ? "finetuned" : ui.adapter.value;
}

async function ask(question) {
  const variants = currentMode() === "compare" ? VARIANTS : [currentMode()];
  const earlier = turns.slice();
  const turn = { question, models: { base: "base", finetuned: finetunedModel() }, answers: {} };
  turns.push(turn);
  const view = turnView(turn, variants);
  setBusy(true);
  try {
    await Promise.all(variants.map((variant) => view.answer(variant, earlier)));
  } finally {
    setBusy(inFlight.size > 0);
  }
}

function turnView(turn, variants) {
  const article = element("article", "turn");
  const answers = element("div", variants.length > 1 ? "answers compare" : "answers");
  const slots = Object.fromEntries(
    variants.map((variant) => {
      const model = turn.models[variant];
      return [variant, answerSlot(variant, model === variant ? LABELS[variant] : model)];
    }),
  );
  answers.append(...Object.values(slots).map((slot) => slot.node));
  article.append(element("div", "question", turn.question), answers);
  ui.transcript.append(article);
  scrollDown();

  const view = {
    /** Stream `variant`'s answer into its slot; failures are shown there, with a retry. */
    async answer(variant, earlier) {
      const slot = slots[variant];
      const result = { text: "", id: null, ok: false };
      turn.answers[variant] = result;
      const controller = new AbortController();
      inFlight.add(controller);
      slot.start();
      try {
        const done = await streamChat({
          model: turn.models[variant],
          messages: [...contextFor(variant, earlier), { role: "user", content: turn.question }],
          signal: controller.signal,
          onText: (piece) => {
            result.text += piece;
            slot.show(result.text);
          },
        });
        Object.assign(result, { id: done.id, ok: true });
        slot.finish(done.finishReason, done.id, done.sources);
        if (variants.length > 1 && feedbackOn && VARIANTS.every((v) => turn.answers[v]?.ok)) {
          article.append(preference(turn));
        }
      } catch (error) {
        if (error.name === "AbortError") return;
        const failure =
          error instanceof ApiFailure ? error : new ApiFailure("error", `The page failed: ${error.message}`);
        slot.fail(failure.message, () => retry(variant, earlier));
        if (failure.kind === "auth") askForToken(failure.message);
      } finally {
        inFlight.delete(controller);
      }
    },
  };

  function retry(variant, earlier) {
    if (!turns.includes(turn)) return; // "new chat" since
    setBusy(true);
    view.answer(variant, earlier).finally(() => setBusy(inFlight.size > 0));
  }
  return view;
}

function answerSlot(variant, label) {
  const node = element("section", "answer");
  node.dataset.variant = variant;
  const body = element("div", "body");
  const footer = element("div", "footer");
  node.append(element("h2", "label", label), body, footer);
  return {
    node,
    start() {
      node.setAttribute("aria-busy", "true");
      node.classList.remove("failed");
      body.replaceChildren();
      footer.replaceChildren(element("span", "typing", "…"));
    },
    show(text) {
      const follow = nearBottom();
      renderMarkdown(text, body);
      if (follow) scrollDown();
    },
    finish(finishReason, completionId, sources = []) {
      node.removeAttribute("aria-busy");
      node.dataset.completionId = completionId ?? "";
      node.querySelector(".sources")?.remove();
      if (sources.length) node.insertBefore(sourceList(sources), footer);
      footer.replaceChildren();
      if (NOTES[finishReason]) footer.append(element("span", "note", NOTES[finishReason]));
      if (feedbackOn && completionId) footer.append(thumbs(completionId));
    },
    fail(message, retry) {
      node.removeAttribute("aria-busy");
      node.classList.add("failed");
      const error = element("p", "error", message);
      error.setAttribute("role", "alert");
      const again = element("button", "retry", "Retry");
      again.type = "button";
      again.addEventListener("click", retry);
      footer.replaceChildren(error, again);
    },
  };
}

/** The forum posts an answer was grounded on: thread title as a link, and the quoted excerpt. */
function sourceList(sources) {
  const list = element("ol", "sources");
  list.setAttribute("aria-label", "Sources");
  for (const source of sources.slice(0, 3)) {
    const item = element("li");
    const link = element("a", "", source.title || "forum thread");
    link.href = safeUrl(source.url);
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    item.append(link);
    if (source.excerpt) item.append(element("q", "excerpt", source.excerpt));
    list.append(item);
  }
  return list;
}

/** Only web links become hrefs; anything else (javascript:, data:) links nowhere. */
function safeUrl(url) {
  try {
    const parsed = new URL(url, location.href);
    return ["http:", "https:"].includes(parsed.protocol) ? parsed.href : "#";
  } catch {
    return "#";
  }
}

/** 👍/👎 on one answer. */
function thumbs(completionId) {
  return voteButtons("Was this answer good?", [
    ["👍", "Good answer", { answer_id: completionId, rating: "up" }],
    ["👎", "Bad answer", { answer_id: completionId, rating: "down" }],
  ]);
}

/** "Which is better?" under a compared pair. */
/** Which answer is better: side a is the base's, side b the adapter's (by its name when picked). */
function preference(turn) {
  const pair = { a_answer_id: turn.answers.base.id, b_answer_id: turn.answers.finetuned.id };
  const model = turn.models.finetuned;
  const name = model === "finetuned" ? LABELS.finetuned : model;
  return voteButtons("Which is better?", [
    ["Base", "Base is better", { ...pair, choice: "a" }],
    [name, `${name} is better`, { ...pair, choice: "b" }],
    ["Tie", "Both are as good", { ...pair, choice: "tie" }],
    ["Both bad", "Both are bad", { ...pair, choice: "both_bad" }],
  ]);
}

function voteButtons(question, choices) {
  const group = element("div", "votes");
  group.setAttribute("role", "group");
  group.setAttribute("aria-label", question);
  const status = element("span", "vote-status");
  const buttons = choices.map(([text, label, body]) => {
    const button = element("button", "vote", text);
    button.type = "button";
    button.setAttribute("aria-label", label);
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", async () => {
      try {
        await sendFeedback(body); // the server knows this browser by its voter cookie
      } catch (error) {
        status.textContent = error instanceof ApiFailure ? error.message : `The vote failed: ${error.message}`;
        if (error.kind === "auth") askForToken(error.message);
        return;
      }
      for (const other of buttons) other.setAttribute("aria-pressed", String(other === button));
      status.textContent = "Thanks, vote recorded.";
    });
    return button;
  });
  group.append(element("span", "vote-question", question), ...buttons, status);
  return group;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.send.textContent = busy ? "Answering…" : "Send";
}

function nearBottom() {
  const t = ui.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 80;
}

function scrollDown() {
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function showNotice(message) {
  ui.notice.textContent = message;
  ui.notice.hidden = !message;
}

function askForToken(message) {
  ui.tokenMessage.textContent = message;
  ui.tokenForm.hidden = false;
  ui.askForm.hidden = true;
  ui.token.value = "";
  ui.token.focus();
}

/** Check this tab's token (if any) against the API; ask for one when it is needed. */
async function unlock() {
  let models;
  try {
    models = await servedModels();
  } catch (error) {
    if (!(error instanceof ApiFailure)) throw error;
    if (error.kind === "auth") {
      const refused = apiToken.get() !== "";
      apiToken.clear();
      askForToken(refused ? error.message : NEEDS_TOKEN);
    } else {
      showNotice(error.message);
    }
    return;
  }
  showNotice("");
  offerAdapters(models);
  ui.tokenForm.hidden = true;
  ui.askForm.hidden = false;
  ui.question.focus();
}

/**
 * With several adapters, offer each by its own name (those GET /v1/models lists with
 * parent "base" and themselves as root), the default one chosen; with one or none, no picker.
 */
function offerAdapters(models) {
  const adapters = models.filter((m) => m.parent === "base" && m.root === m.id && m.id !== "finetuned");
  const defaultName = models.find((m) => m.id === "finetuned")?.root;
  const picked = ui.adapter.value;
  ui.adapter.replaceChildren(
    ...adapters.map((m) => new Option(m.id === defaultName ? `${m.id} (default)` : m.id, m.id)),
  );
  ui.adapter.value = adapters.some((m) => m.id === picked) ? picked : (defaultName ?? "");
  ui.adapterPicker.hidden = adapters.length < 2;
}

/** Adapters come and go while the server runs: list them again when the picker is opened. */
async function refreshAdapters() {
  try {
    offerAdapters(await servedModels());
  } catch {
    // keep the list shown; a question will say what is wrong
  }
}

/** Without an adapter only the base model answers: offer only that. */
async function offerVariants() {
  const engine = await engineStatus();
  if (engine === null || engine.adapter !== null) return;
  for (const input of document.querySelectorAll('input[name="mode"]')) {
    input.checked = input.value === "base";
    input.disabled = input.value !== "base";
    if (input.disabled) input.parentElement.title = "No finetuned adapter is loaded (ADAPTER_PATH is unset).";
  }
}

ui.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  apiToken.set(ui.token.value.trim());
  ui.token.value = "";
  unlock();
});

ui.askForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const question = ui.question.value.trim();
  if (!question || inFlight.size > 0) return;
  ui.question.value = "";
  ask(question);
});

ui.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.askForm.requestSubmit();
  }
});

ui.newChat.addEventListener("click", () => {
  for (const controller of inFlight) controller.abort();
  inFlight.clear();
  turns = [];
  ui.transcript.replaceChildren();
  setBusy(false);
  ui.question.focus();
});

ui.adapter.addEventListener("focus", refreshAdapters);

offerVariants();
unlock();
