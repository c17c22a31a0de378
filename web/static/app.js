// The chat page: signing in, conversations kept in this browser, streamed replies, keys, usage, users and hosts.

import { setUpHosts, setUpKeys, setUpUsers } from "./admin.js";
import { ApiError, forgetToken, getJson, signIn, streamChat, token, tokenExpiry, whenSignedOut } from "./api.js";
import { prepareAttachment, withAttachments } from "./attachments.js";
import * as store from "./conversations.js";
import { saveBlob } from "./download.js";
import { renderMarkdown } from "./markdown.js";
import { setUpTheme } from "./theme.js";
import { setUpUsage } from "./usage.js";

const $ = (selector) => document.querySelector(selector);

const state = {
  me: null,
  models: [],
  conversations: [],
  current: null,
  streaming: null, // the AbortController of the reply being streamed
  attachments: [],
  expiryTimer: null,
  modelsProblem: null, // why there is no model to pick (Ollama down, none allowed), while that holds
  modelsRefresh: null, // the look at the models under way, if any
};

// ---- signing in and out

function showSignIn(notice) {
  $("#app-view").hidden = true;
  $("#signin-view").hidden = false;
  $("#signin-notice").textContent = notice || "";
  $("#signin-notice").hidden = !notice;
  $("#signin-email").focus();
}

function signOut(notice) {
  state.streaming?.abort();
  clearTimeout(state.expiryTimer);
  forgetToken();
  state.me = null;
  showSignIn(notice);
}

function watchExpiry() {
  clearTimeout(state.expiryTimer);
  const expiry = tokenExpiry();
  if (expiry === null) return;
  // setTimeout can't wait longer than ~24.8 days; a token living longer is checked again by then.
  const wait = Math.min(Math.max(expiry - Date.now(), 0), 2 ** 31 - 1);
  state.expiryTimer = setTimeout(() => {
    if (tokenExpiry() !== null && tokenExpiry() <= Date.now()) {
      signOut("Your session expired. Please sign in again.");
    } else {
      watchExpiry();
    }
  }, wait);
}

$("#signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = $("#signin-error");
  error.hidden = true;
  try {
    await signIn($("#signin-email").value.trim(), $("#signin-password").value);
    $("#signin-password").value = "";
    await start();
  } catch (failure) {
    error.textContent =
      failure.status === 401 ? "Wrong email or password." : failure.message || "Could not sign in.";
    error.hidden = false;
  }
});

$("#signout").addEventListener("click", () => signOut("You signed out."));
whenSignedOut(signOut);

// ---- views

function showView(name) {
  for (const view of ["chat", "keys", "usage", "users", "hosts"]) {
    $(`#${view}-view`).hidden = view !== name;
    const tab = document.querySelector(`nav [data-view="${view}"]`);
    if (view === name) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  $("#sidebar").classList.toggle("only-chat", name !== "chat");
  if (name === "keys") refreshKeys();
  if (name === "usage") refreshUsage();
  if (name === "users") refreshUsers();
  if (name === "hosts") refreshHosts();
}

for (const tab of document.querySelectorAll("nav [data-view]")) {
  tab.addEventListener("click", () => showView(tab.dataset.view));
}

$("#toggle-sidebar").addEventListener("click", () => {
  const open = $("#sidebar").classList.toggle("open");
  $("#toggle-sidebar").setAttribute("aria-expanded", String(open));
});

const refreshKeys = setUpKeys($);
const refreshUsage = setUpUsage($, () => state.me);
const refreshUsers = setUpUsers($);
const refreshHosts = setUpHosts($);
setUpTheme($("#theme-toggle"));

// ---- conversations

function save() {
  if (state.current) state.current.updatedAt = new Date().toISOString();
  store.saveAll(state.conversations);
}

function select(conversation) {
  state.current = conversation;
  store.rememberCurrent(conversation.id);
  state.attachments = [];
  renderAll();
  $("#sidebar").classList.remove("open");
}

function newConversation() {
  const conversation = store.blankConversation($("#model-select").value || state.models[0]?.name || "");
  state.conversations.unshift(conversation);
  save();
  select(conversation);
  $("#message-input").focus();
}

function renderSidebar() {
  $("#conversation-list").replaceChildren(
    ...state.conversations.map((conversation) => {
      const item = document.createElement("li");
      const link = document.createElement("button");
      link.type = "button";
      link.className = "conversation";
      link.textContent = conversation.title;
      if (conversation === state.current) link.setAttribute("aria-current", "true");
      link.addEventListener("click", () => select(conversation));
      item.append(link);
      return item;
    }),
  );
}

function renderSettings() {
  const conversation = state.current;
  $("#system-prompt").value = conversation.system;
  $("#temperature").value = conversation.temperature ?? "";
  $("#max-tokens").value = conversation.maxTokens ?? "";
  const select = $("#model-select");
  if (conversation.model && ![...select.options].some((option) => option.value === conversation.model)) {
    // A model this conversation used that the server no longer offers (or this user may not use).
    select.add(new Option(`${conversation.model} (unavailable)`, conversation.model));
  }
  select.value = conversation.model || select.value;
}

function messageElement(message) {
  const element = document.createElement("article");
  element.className = `message ${message.role}`;
  const who = document.createElement("header");
  who.textContent = message.role === "user" ? "You" : message.model || "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  element.append(who, body);
  if (message.attachments?.length) {
    const files = document.createElement("p");
    files.className = "files";
    files.textContent = `Attached: ${message.attachments.join(", ")}`;
    element.append(files);
  }
  fillMessage(element, message);
  return element;
}

function fillMessage(element, message) {
  const body = element.querySelector(".body");
  if (message.role === "assistant") renderMarkdown(body, message.content);
  else body.textContent = message.content;
  element.classList.toggle("stopped", Boolean(message.stopped));
}

function renderMessages() {
  const messages = $("#messages");
  messages.replaceChildren(...state.current.messages.map(messageElement));
  if (!state.current.messages.length) {
    const hint = document.createElement("p");
    hint.className = "empty";
    hint.textContent = "Ask anything. Your conversations are kept in this browser only.";
    messages.append(hint);
  }
  messages.scrollTop = messages.scrollHeight;
}

function renderAttachments() {
  $("#attachments").replaceChildren(
    ...state.attachments.map((attachment, index) => {
      const item = document.createElement("li");
      item.textContent = `${attachment.kind === "image" ? "🖼" : "📄"} ${attachment.name}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "icon";
      remove.setAttribute("aria-label", `Remove ${attachment.name}`);
      remove.textContent = "×";
      remove.addEventListener("click", () => {
        state.attachments.splice(index, 1);
        renderAttachments();
      });
      item.append(remove);
      return item;
    }),
  );
}

function renderAll() {
  renderSidebar();
  renderSettings();
  renderMessages();
  renderAttachments();
  showChatError(null);
}

// A standing problem with the models stays said until it is solved: clearing a passing error brings it back.
function showChatError(message) {
  const shown = message || state.modelsProblem;
  $("#chat-error").textContent = shown || "";
  $("#chat-error").hidden = !shown;
}

$("#new-conversation").addEventListener("click", newConversation);

$("#rename-conversation").addEventListener("click", () => {
  const title = prompt("Rename the conversation", state.current.title);
  if (title === null || !title.trim()) return;
  state.current.title = title.trim();
  save();
  renderSidebar();
});

$("#delete-conversation").addEventListener("click", () => {
  if (!confirm(`Delete "${state.current.title}"? This can't be undone.`)) return;
  state.conversations = state.conversations.filter((conversation) => conversation !== state.current);
  save();
  if (state.conversations.length) select(state.conversations[0]);
  else newConversation();
});

$("#model-select").addEventListener("change", (event) => {
  state.current.model = event.target.value;
  save();
});
$("#system-prompt").addEventListener("change", (event) => {
  state.current.system = event.target.value;
  save();
});
$("#temperature").addEventListener("change", (event) => {
  state.current.temperature = event.target.value === "" ? null : Number(event.target.value);
  save();
});
$("#max-tokens").addEventListener("change", (event) => {
  state.current.maxTokens = event.target.value === "" ? null : Number(event.target.value);
  save();
});

// ---- export and import

function download(filename, type, text) {
  saveBlob(filename, new Blob([text], { type }));
}

function fileStem() {
  return state.current.title.replace(/[^\w.-]+/g, "-").replace(/^-|-$/g, "") || "conversation";
}

$("#export-json").addEventListener("click", () =>
  download(`${fileStem()}.json`, "application/json", JSON.stringify(state.current, null, 2)),
);
$("#export-markdown").addEventListener("click", () =>
  download(`${fileStem()}.md`, "text/markdown", store.toMarkdown(state.current)),
);
$("#import-file").addEventListener("change", async (event) => {
  const [file] = event.target.files;
  event.target.value = "";
  if (!file) return;
  try {
    const conversation = store.fromExport(await file.text());
    state.conversations.unshift(conversation);
    save();
    select(conversation);
  } catch (error) {
    showView("chat");
    showChatError(error.message);
  }
});

// ---- sending, streaming, stopping

function setStreaming(controller) {
  state.streaming = controller;
  $("#send").hidden = Boolean(controller);
  $("#stop").hidden = !controller;
}

$("#attach-file").addEventListener("change", async (event) => {
  const files = [...event.target.files];
  event.target.value = "";
  showChatError(null);
  for (const file of files) {
    try {
      state.attachments.push(await prepareAttachment(file));
    } catch (error) {
      showChatError(error.message);
    }
  }
  renderAttachments();
});

async function send() {
  const text = $("#message-input").value.trim();
  if ((!text && !state.attachments.length) || state.streaming) return;
  const conversation = state.current;
  // A standing problem with the models may be over (Ollama came up, an admin allowed a model): look again.
  if (state.modelsProblem) refreshModels();
  if (!conversation.model) {
    // Say why there is none, not just that there is none.
    showChatError(state.modelsProblem || "Pick a model first.");
    return;
  }
  const { content, images, names } = withAttachments(text, state.attachments);
  const question = { role: "user", content, ...(images.length ? { images } : {}), ...(names.length ? { attachments: names } : {}) };
  if (!conversation.messages.length) conversation.title = store.titleFrom(text || names[0]);
  conversation.messages.push(question);
  const reply = { role: "assistant", content: "", model: conversation.model };
  conversation.messages.push(reply);
  $("#message-input").value = "";
  state.attachments = [];
  save();
  renderAll();

  const element = $("#messages").lastElementChild;
  element.classList.add("streaming");
  const controller = new AbortController();
  setStreaming(controller);
  let pending = false;
  const paint = () => {
    pending = false;
    fillMessage(element, reply);
    $("#messages").scrollTop = $("#messages").scrollHeight;
  };
  try {
    const body = { model: conversation.model, messages: store.chatMessages(conversation) };
    const options = store.chatOptions(conversation);
    if (Object.keys(options).length) body.options = options;
    await streamChat(
      body,
      (piece) => {
        reply.content += piece;
        if (!pending) {
          pending = true;
          requestAnimationFrame(paint);
        }
      },
      controller.signal,
    );
  } catch (error) {
    if (error.name === "AbortError") {
      reply.stopped = true;
    } else {
      showChatError(error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`);
      if (!reply.content) conversation.messages.pop();
    }
  } finally {
    setStreaming(null);
    element.classList.remove("streaming");
    save();
    if (state.current === conversation) {
      const error = $("#chat-error").textContent;
      renderMessages();
      renderSidebar();
      showChatError(error || null);
    }
  }
}

$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("#message-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
$("#stop").addEventListener("click", () => state.streaming?.abort());

// ---- start

// Fills the model select; returns what to tell the person if that failed or there is no model.
async function loadModels() {
  const select = $("#model-select");
  try {
    const { models } = await getJson("/models");
    state.models = models;
    select.replaceChildren(
      ...models.map((model) => {
        const size = model.details?.parameter_size;
        return new Option(size ? `${model.name} (${size})` : model.name, model.name);
      }),
    );
    return models.length ? null : "No model is available to you yet: ask your admin.";
  } catch (error) {
    return error.status === 401 ? null : error.message;
  }
}

// One look at a time, and only for the person who asked: a sign-out meanwhile makes its answer stale.
function refreshModels() {
  state.modelsRefresh ??= (async () => {
    const asker = state.me;
    const problem = await loadModels();
    if (state.me !== asker) return;
    state.modelsProblem = problem;
    if (!state.current.model && state.models.length) {
      state.current.model = state.models[0].name;
      save();
      renderSettings();
    }
    showChatError(null);
  })().finally(() => {
    state.modelsRefresh = null;
  });
  return state.modelsRefresh;
}

async function start() {
  const stored = token();
  if (!stored || (tokenExpiry(stored) !== null && tokenExpiry(stored) <= Date.now())) {
    forgetToken();
    showSignIn(stored ? "Your session expired. Please sign in again." : null);
    return;
  }
  try {
    state.me = await getJson("/me");
  } catch (error) {
    if (error.status !== 401) showSignIn(error.message);
    return;
  }
  watchExpiry();
  $("#whoami").textContent = state.me.email;
  $("#nav-users").hidden = state.me.role !== "admin";
  $("#nav-hosts").hidden = state.me.role !== "admin";
  $("#signin-view").hidden = true;
  $("#app-view").hidden = false;
  state.modelsProblem = await loadModels();
  state.conversations = store.loadAll();
  const remembered = state.conversations.find((conversation) => conversation.id === store.currentId());
  showView("chat");
  if (remembered) select(remembered);
  else if (state.conversations.length) select(state.conversations[0]);
  else newConversation();
  showChatError(null);
}

start();
