// The page's side of the HTTP API: the token, streamed chat completions, votes,
// and every failure turned into a sentence a person can act on.

const TOKEN_KEY = "freeski-api-token";

/** The API token lives in sessionStorage: kept for this tab, never put in a URL. */
export const apiToken = {
  get: () => sessionStorage.getItem(TOKEN_KEY) ?? "",
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** A request that failed; `kind` is auth, busy, timeout, unavailable, down, cut or error. */
export class ApiFailure extends Error {
  constructor(kind, message, retryAfterS = null) {
    super(message);
    this.kind = kind;
    this.retryAfterS = retryAfterS;
  }
}

const DOWN = "Cannot reach the server: is python -m bot api still running? Reload the page when it is.";
const CUT = "The connection broke before the answer was complete: try again.";

/**
 * The models served now, as GET /v1/models lists them (`{id, root, parent}` each);
 * resolves once the API accepts this tab's token (or needs none).
 */
export async function servedModels() {
  const body = await (await request("/v1/models", { method: "GET" })).json();
  return Array.isArray(body.data) ? body.data : [];
}

/** The engine's status from /healthz (it needs no token); null when the server is not there. */
export async function engineStatus() {
  try {
    return (await (await fetch("/healthz")).json()).engine ?? null;
  } catch {
    return null;
  }
}

/**
 * Stream one answer: `onText` gets each new piece of text as it is generated.
 * Resolves to `{id, finishReason, sources}`; `id` is the completion id votes refer to,
 * `sources` the forum posts the answer was grounded on (the last chunk's extension field).
 */
export async function streamChat({ model, messages, signal, onText }) {
  const response = await request("/v1/chat/completions", {
    method: "POST",
    body: JSON.stringify({ model, messages, stream: true }),
    signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let id = null;
  let finishReason = null;
  let sources = [];
  for (;;) {
    const { value, done } = await read(reader);
    if (done) throw new ApiFailure("cut", CUT);
    buffer += value;
    for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return { id, finishReason, sources };
        const chunk = JSON.parse(data);
        if (chunk.error) throw streamFailure(chunk.error);
        id ??= chunk.id;
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) onText(choice.delta.content);
        if (choice?.finish_reason) finishReason = choice.finish_reason;
        if (Array.isArray(chunk.sources)) sources = chunk.sources;
      }
    }
  }
}

/** Record a vote; `body` is what POST /v1/feedback takes. */
export async function sendFeedback(body) {
  await request("/v1/feedback", { method: "POST", body: JSON.stringify(body) });
}

async function request(path, init) {
  const headers = { "Content-Type": "application/json" };
  const token = apiToken.get();
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiFailure("down", DOWN);
  }
  if (!response.ok) throw await failureOf(response);
  return response;
}

async function read(reader) {
  try {
    return await reader.read();
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiFailure("cut", CUT);
  }
}

async function failureOf(response) {
  let message = "";
  try {
    message = (await response.json()).error.message ?? "";
  } catch {
    // not the API's JSON (a proxy's error page): the status says enough
  }
  const retryAfterS = Number(response.headers.get("Retry-After")) || null;
  switch (response.status) {
    case 401:
      return new ApiFailure(
        "auth",
        "The server refused the API token: enter the token its API_TOKEN is set to.",
      );
    case 429:
      return new ApiFailure(
        "busy",
        retryAfterS
          ? `The server is busy: try again in ${retryAfterS} s.`
          : "The server is busy: try again in a moment.",
        retryAfterS,
      );
    case 504:
      return new ApiFailure(
        "timeout",
        "No answer in time: the server stopped waiting for the model. Try again, or ask something shorter.",
      );
    case 502:
    case 503:
      return new ApiFailure("unavailable", `The model is not available right now: ${message || "try again later."}`);
    default:
      return new ApiFailure("error", message || `The server answered ${response.status} ${response.statusText}.`);
  }
}

function streamFailure(error) {
  if (error.type === "timeout") {
    return new ApiFailure("timeout", `The answer was stopped before it was complete: ${error.message}`);
  }
  return new ApiFailure("error", `The answer failed part way: ${error.message}`);
}
