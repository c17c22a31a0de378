// Saving something the page made or fetched as a file: a link to a Blob, clicked. The API's own downloads
// need the Authorization header, which a plain link can't send, so the page fetches them and saves the Blob.

export function saveBlob(filename, blob) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}
