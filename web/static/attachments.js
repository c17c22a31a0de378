// Files attached to a message. Each is uploaded through /upload (so the gateway's size cap applies and the
// file is kept for its owner); an image then goes to the model in the message's `images` (vision models read
// them), a text file goes into the message itself.

import { request } from "./api.js";

const TEXT_EXTENSIONS = /\.(txt|md|markdown|csv|tsv|json|ya?ml|xml|html?|css|js|ts|py|rb|go|rs|java|c|h|cpp|sh|sql|toml|ini|log)$/i;
const MAX_TEXT_CHARS = 200_000;

function isImage(file) {
  return file.type.startsWith("image/");
}

function isText(file) {
  return file.type.startsWith("text/") || file.type === "application/json" || TEXT_EXTENSIONS.test(file.name);
}

function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    // Ollama wants the bare base64, without the `data:...;base64,` prefix.
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

// Uploads and reads one file; returns what the message needs from it. Throws ApiError (413 too large, ...).
export async function prepareAttachment(file) {
  if (!isImage(file) && !isText(file)) {
    throw new Error(`${file.name}: only images and text files can be sent to a model.`);
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const stored = await (await request("POST", "/upload", form, { form: true })).json();
  if (isImage(file)) {
    return { name: file.name, kind: "image", image: await readAsBase64(file), download: stored.download_path };
  }
  let text = await file.text();
  if (text.length > MAX_TEXT_CHARS) text = `${text.slice(0, MAX_TEXT_CHARS)}\n[… cut: the file is longer]`;
  return { name: file.name, kind: "text", text, download: stored.download_path };
}

// The message a user sends, with their attachments folded in.
export function withAttachments(text, attachments) {
  const files = attachments.filter((a) => a.kind === "text");
  const content = [text, ...files.map((a) => `File ${a.name}:\n\`\`\`\n${a.text}\n\`\`\``)].filter(Boolean).join("\n\n");
  const images = attachments.filter((a) => a.kind === "image").map((a) => a.image);
  return { content, images, names: attachments.map((a) => a.name) };
}
