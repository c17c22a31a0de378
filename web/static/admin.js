// The "API keys" page (everyone's own keys), and the "Users" (with quotas.js) and "Hosts" pages (admins only).

import { getJson, sendJson } from "./api.js";
import { copyText } from "./markdown.js";
import { quotaSummary, setUpQuotaForm } from "./quotas.js";

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  row.append(td);
  return td;
}

function button(label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.addEventListener("click", onClick);
  return element;
}

function showError(box, error) {
  box.textContent = error ? error.message : "";
  box.hidden = !error;
}

function date(stamp) {
  return stamp ? stamp.replace("T", " ").replace("Z", " UTC") : "never";
}

export function setUpKeys($) {
  async function refresh() {
    try {
      const keys = await getJson("/keys");
      $("#key-rows").replaceChildren(
        ...keys.map((key) => {
          const row = document.createElement("tr");
          cell(row, key.name);
          cell(row, `${key.prefix}…`);
          cell(row, key.priority);
          cell(row, date(key.created_at));
          cell(row, date(key.last_used_at));
          cell(row, key.expires_at ? date(key.expires_at) : "never");
          cell(row, "").append(
            button("Revoke", async () => {
              if (!confirm(`Revoke the key "${key.name}"? Scripts using it will stop working.`)) return;
              try {
                await sendJson("DELETE", `/keys/${key.id}`);
                await refresh();
              } catch (error) {
                showError($("#keys-error"), error);
              }
            }),
          );
          return row;
        }),
      );
      showError($("#keys-error"), null);
    } catch (error) {
      showError($("#keys-error"), error);
    }
  }

  $("#key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const days = $("#key-days").value;
    try {
      const created = await sendJson("POST", "/keys", {
        name: $("#key-name").value.trim(),
        expires_in_days: days ? Number(days) : null,
        priority: $("#key-batch").checked ? "batch" : "interactive",
      });
      $("#new-key-value").textContent = created.key;
      $("#new-key").hidden = false;
      event.target.reset();
      await refresh();
    } catch (error) {
      showError($("#keys-error"), error);
    }
  });
  $("#copy-new-key").addEventListener("click", async () => {
    if (await copyText($("#new-key-value").textContent)) $("#copy-new-key").textContent = "Copied";
    else window.getSelection().selectAllChildren($("#new-key-value"));
  });
  return refresh;
}

function modelsFrom(text) {
  const names = text.split(",").map((name) => name.trim()).filter(Boolean);
  return names.length ? names : null;
}

export function setUpUsers($) {
  const fillQuotaForm = setUpQuotaForm($, () => refresh(), (error) => showError($("#users-error"), error));

  async function save(user, changes) {
    try {
      await sendJson("PATCH", `/admin/users/${user.id}`, changes);
      await refresh();
    } catch (error) {
      showError($("#users-error"), error);
    }
  }

  async function refresh() {
    try {
      const users = await getJson("/admin/users");
      $("#user-rows").replaceChildren(
        ...users.map((user) => {
          const row = document.createElement("tr");
          cell(row, user.email);
          const role = document.createElement("select");
          role.setAttribute("aria-label", `Role of ${user.email}`);
          for (const name of ["user", "admin"]) role.add(new Option(name, name, false, name === user.role));
          cell(row, "").append(role);
          const models = document.createElement("input");
          models.setAttribute("aria-label", `Models of ${user.email}`);
          models.placeholder = "all";
          models.value = user.models ? user.models.join(", ") : "";
          cell(row, "").append(models);
          cell(row, user.disabled ? "yes" : "no");
          cell(row, quotaSummary(user.quota));
          cell(row, "").append(
            button("Save", () => save(user, { role: role.value, models: modelsFrom(models.value) })),
            button(user.disabled ? "Enable" : "Disable", () => save(user, { disabled: !user.disabled })),
          );
          return row;
        }),
      );
      fillQuotaForm(users);
      showError($("#users-error"), null);
    } catch (error) {
      showError($("#users-error"), error);
    }
  }

  $("#user-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await sendJson("POST", "/admin/users", {
        email: $("#new-user-email").value.trim(),
        password: $("#new-user-password").value,
        role: $("#new-user-role").value,
        models: modelsFrom($("#new-user-models").value),
      });
      event.target.reset();
      await refresh();
    } catch (error) {
      showError($("#users-error"), error);
    }
  });
  return refresh;
}

// One line per model a host holds loaded or runs: its slots (set or learned), requests running, waiting.
function modelLines(host) {
  const lines = Object.entries(host.capacity).map(([model, slots]) => {
    const capacity = slots.capacity === null ? "slots not known yet" : `${slots.capacity} slots (${slots.source})`;
    return `${model}: ${capacity}, ${slots.inflight} running, ${slots.waiting} waiting`;
  });
  return lines.length ? lines.join("\n") : "none loaded";
}

function hostState(host) {
  if (!host.enabled) return "disabled";
  return host.draining ? "draining" : "enabled";
}

export function setUpHosts($) {
  async function change(request) {
    try {
      await request();
      await refresh();
    } catch (error) {
      showError($("#hosts-error"), error);
    }
  }

  async function refresh() {
    try {
      const hosts = await getJson("/admin/hosts");
      $("#host-rows").replaceChildren(
        ...hosts.map((host) => {
          const row = document.createElement("tr");
          cell(row, host.name);
          cell(row, host.url);
          cell(row, host.source);
          cell(row, host.healthy ? "healthy" : `out of service: ${host.problem}`);
          cell(row, hostState(host));
          cell(row, modelLines(host)).className = "lines";
          const path = `/admin/hosts/${encodeURIComponent(host.id)}`;
          const actions = cell(row, "");
          actions.append(
            button(host.draining ? "Resume" : "Drain", () =>
              change(() => sendJson("PATCH", path, { draining: !host.draining })),
            ),
            button(host.enabled ? "Disable" : "Enable", () =>
              change(() => sendJson("PATCH", path, { enabled: !host.enabled })),
            ),
          );
          if (host.source === "stored") {
            actions.append(
              button("Remove", () => {
                if (!confirm(`Remove the host "${host.name}"? Requests running there finish.`)) return;
                change(() => sendJson("DELETE", path));
              }),
            );
          }
          for (const control of actions.querySelectorAll("button")) {
            control.setAttribute("aria-label", `${control.textContent} ${host.name}`);
          }
          return row;
        }),
      );
      showError($("#hosts-error"), null);
    } catch (error) {
      showError($("#hosts-error"), error);
    }
  }

  $("#host-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const slots = $("#new-host-slots").value;
    try {
      await sendJson("POST", "/admin/hosts", {
        name: $("#new-host-name").value.trim(),
        url: $("#new-host-url").value.trim(),
        slots: slots ? Number(slots) : null,
      });
      event.target.reset();
      await refresh();
    } catch (error) {
      showError($("#hosts-error"), error);
    }
  });
  $("#refresh-hosts").addEventListener("click", refresh);
  return refresh;
}
