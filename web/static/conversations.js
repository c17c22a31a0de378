// Conversations live in this browser's localStorage, never on the server; they survive a reload.

const STORE_KEY = "ogw.conversations";
const CURRENT_KEY = "ogw.current";

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

export function blankConversation(model = "") {
  const now = new Date().toISOString();
  return {
    id: newId(),
    title: "New conversation",
    model,
    system: "",
    temperature: null,
    maxTokens: null,
    messages: [],
    createdAt: now,
    updatedAt: now,
  };
}

export function loadAll() {
  try {
    const stored = JSON.parse(localStorage.getItem(STORE_KEY) || "[]");
    return Array.isArray(stored) ? stored.filter((conversation) => conversation && conversation.id) : [];
  } catch {
    return [];
  }
}

export function saveAll(conversations) {
  localStorage.setItem(STORE_KEY, JSON.stringify(conversations));
}

export function currentId() {
  return localStorage.getItem(CURRENT_KEY);
}

export function rememberCurrent(id) {
  localStorage.setItem(CURRENT_KEY, id);
}

// A title from the first thing the user said.
export function titleFrom(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New conversation";
}

// The messages Ollama is sent: the system prompt first, then the exchange so far.
export function chatMessages(conversation) {
  const messages = [];
  if (conversation.system.trim()) messages.push({ role: "system", content: conversation.system });
  for (const message of conversation.messages) {
    if (message.role === "assistant" && !message.content) continue;
    const sent = { role: message.role, content: message.content };
    if (message.images?.length) sent.images = message.images;
    messages.push(sent);
  }
  return messages;
}

export function chatOptions(conversation) {
  const options = {};
  if (conversation.temperature !== null && conversation.temperature !== "") {
    options.temperature = Number(conversation.temperature);
  }
  if (conversation.maxTokens) options.num_predict = Number(conversation.maxTokens);
  return options;
}

export function toMarkdown(conversation) {
  const lines = [`# ${conversation.title}`, ""];
  if (conversation.system.trim()) lines.push(`> System: ${conversation.system}`, "");
  for (const message of conversation.messages) {
    const who = message.role === "user" ? "You" : `Assistant${message.model ? ` (${message.model})` : ""}`;
    lines.push(`## ${who}`, "", message.content, "");
  }
  return lines.join("\n");
}

// A conversation from an exported JSON file; throws with a plain message if it isn't one.
export function fromExport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new Error("That file is not JSON.");
  }
  const valid =
    data && Array.isArray(data.messages) &&
    data.messages.every((m) => m && ["user", "assistant", "system"].includes(m.role) && typeof m.content === "string");
  if (!valid) throw new Error("That file is not a conversation exported from this page.");
  return {
    ...blankConversation(typeof data.model === "string" ? data.model : ""),
    title: typeof data.title === "string" && data.title ? data.title : "Imported conversation",
    system: typeof data.system === "string" ? data.system : "",
    temperature: typeof data.temperature === "number" ? data.temperature : null,
    maxTokens: typeof data.maxTokens === "number" ? data.maxTokens : null,
    messages: data.messages.map((m) => ({
      role: m.role,
      content: m.content,
      ...(typeof m.model === "string" ? { model: m.model } : {}),
      ...(Array.isArray(m.images) ? { images: m.images.filter((i) => typeof i === "string") } : {}),
    })),
  };
}
