// The quota form of the "Users" page (admins): a person's limits per day or month on tokens, slot time and
// requests, each optional, set or removed through PATCH /admin/users/{id}.

import { sendJson } from "./api.js";

const LIMITS = [
  ["tokens", "#quota-tokens", "tokens"],
  ["slot_seconds", "#quota-slot-seconds", "slot seconds"],
  ["requests", "#quota-requests", "requests"],
];

// "per day: 1,000 tokens, 4 requests", or "none": what the users table shows.
export function quotaSummary(quota) {
  if (!quota) return "none";
  const limits = LIMITS.filter(([key]) => quota[key] !== null && quota[key] !== undefined).map(
    ([key, , unit]) => `${Number(quota[key]).toLocaleString()} ${unit}`,
  );
  return `per ${quota.period}: ${limits.join(", ") || "no limit"}`;
}

export function setUpQuotaForm($, refreshUsers, showError) {
  let people = [];

  function picked() {
    return people.find((person) => String(person.id) === $("#quota-user").value);
  }

  // The form shows the picked person's quota as it stands, to be changed rather than typed again.
  function showPicked() {
    const quota = picked()?.quota;
    $("#quota-period").value = quota?.period ?? "day";
    for (const [key, selector] of LIMITS) $(selector).value = quota?.[key] ?? "";
  }

  async function save(quota) {
    const person = picked();
    if (!person) return;
    try {
      await sendJson("PATCH", `/admin/users/${person.id}`, { quota });
      await refreshUsers();
      showError(null);
    } catch (error) {
      showError(error);
    }
  }

  $("#quota-user").addEventListener("change", showPicked);
  $("#quota-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const quota = { period: $("#quota-period").value };
    for (const [key, selector] of LIMITS) quota[key] = $(selector).value === "" ? null : Number($(selector).value);
    if (LIMITS.every(([key]) => quota[key] === null)) {
      showError(new Error("Set at least one limit, or remove the quota."));
      return;
    }
    save(quota);
  });
  $("#quota-remove").addEventListener("click", () => save(null));

  // Called with the users each time the table is drawn: keeps the picked person picked.
  return function fill(users) {
    const current = $("#quota-user").value;
    people = users;
    $("#quota-user").replaceChildren(...users.map((user) => new Option(user.email, String(user.id))));
    if (users.some((user) => String(user.id) === current)) $("#quota-user").value = current;
    showPicked();
  };
}
