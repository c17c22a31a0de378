// Talking to the gateway: the session token, JSON requests, plain error messages, and chat streams.

const TOKEN_KEY = "ogw.token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let onSignedOut = () => {};

// Called with a reason when the gateway no longer accepts the token (expired, revoked, password changed).
export function whenSignedOut(callback) {
  onSignedOut = callback;
}

export function token() {
  return localStorage.getItem(TOKEN_KEY);
}

export function storeToken(value) {
  localStorage.setItem(TOKEN_KEY, value);
}

export function forgetToken() {
  localStorage.removeItem(TOKEN_KEY);
}

// When the token expires, in milliseconds since the epoch (from its `exp` claim), or null.
export function tokenExpiry(value = token()) {
  try {
    const payload = value.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(payload)).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

// The gateway's errors are {"error": "..."} (or OpenAI's nested shape); a dropped connection has none.
async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const error = body.error;
    message = typeof error === "string" ? error : error?.message || message;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, plainMessage(response.status, message));
}

// What a person should read for each kind of failure.
export function plainMessage(status, message) {
  if (status === 502) return `Ollama is not reachable right now (${message}). Try again later or tell your admin.`;
  if (status === 504) return "Ollama did not answer in time: the model may still be loading. Try again in a moment.";
  if (status === 413) return `Too large: ${message}.`;
  if (status === 429) return `Too many attempts: ${message}.`;
  if (status === 403) return `Not allowed: ${message}.`;
  if (status === 404) return `Not found: ${message}.`;
  return message;
}

export async function request(method, path, body, { form = false, signal } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  let payload;
  if (form) {
    payload = body;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "The gateway can't be reached. Check your connection.");
  }
  if (response.status === 401) {
    const error = await errorFrom(response);
    onSignedOut(`You were signed out: ${error.message}. Please sign in again.`);
    throw error;
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJson(path) {
  return (await request("GET", path)).json();
}

export async function sendJson(method, path, body) {
  const response = await request(method, path, body);
  return response.status === 204 ? null : response.json();
}

export async function signIn(email, password) {
  const response = await fetch("/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ email, password }),
  });
  if (!response.ok) throw await errorFrom(response);
  const { access_token: accessToken } = await response.json();
  storeToken(accessToken);
  return accessToken;
}

// Streams a chat reply from /chat, calling onPiece with each piece of text as it arrives.
// Aborting `signal` closes the connection, which makes Ollama stop generating.
export async function streamChat(body, onPiece, signal) {
  const response = await request("POST", "/chat", { ...body, stream: true }, { signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    const lines = buffered.split("\n");
    buffered = lines.pop();
    for (const line of lines) {
      if (!line.trim()) continue;
      const chunk = JSON.parse(line);
      if (chunk.error) throw new ApiError(200, `The model stopped with an error: ${chunk.error}`);
      if (chunk.message?.content) onPiece(chunk.message.content);
      if (chunk.done) return chunk;
    }
  }
  throw new ApiError(200, "The reply was cut off before the model finished.");
}
