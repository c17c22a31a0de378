// Model replies as Markdown, safely: whatever a model writes can never run script in this page.
//
// Three layers: raw HTML in a reply is escaped, so `<img onerror=...>` shows up as the text it is; what marked
// produces is cleaned by DOMPurify; and the page's Content-Security-Policy refuses inline script anyway.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

const marked = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    html({ text }) {
      return escapeHtml(text);
    },
  },
});

export function renderMarkdown(element, text) {
  const html = DOMPurify.sanitize(marked.parse(text), { USE_PROFILES: { html: true } });
  element.innerHTML = html;
  for (const link of element.querySelectorAll("a")) {
    link.target = "_blank";
    link.rel = "noopener noreferrer";
  }
  for (const block of element.querySelectorAll("pre")) addCopyButton(block);
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // No clipboard permission (e.g. plain http on a LAN address): select the text for the person instead.
    return false;
  }
}

function addCopyButton(block) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.addEventListener("click", async () => {
    const code = block.querySelector("code")?.textContent ?? block.textContent;
    if (await copyText(code)) {
      button.textContent = "Copied";
      setTimeout(() => (button.textContent = "Copy"), 1500);
    } else {
      window.getSelection().selectAllChildren(block);
    }
  });
  block.prepend(button);
}
