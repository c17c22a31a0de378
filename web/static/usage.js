// The "Usage" page: what you used per day and per model (tokens and slot time) and your quota; admins can
// switch to everyone's, by person and by model. Every figure is also in a table, and every name (a model, an
// email) goes into the page as text only.

import { getJson, request } from "./api.js";
import { legend, stackedBars } from "./charts.js";
import { saveBlob } from "./download.js";

const TOKENS = [
  { name: "Prompt tokens", className: "series-prompt", key: "prompt_tokens" },
  { name: "Completion tokens", className: "series-completion", key: "completion_tokens" },
];
const SLOT_TIME = [{ name: "Slot time", className: "series-slot", key: "slot_seconds" }];

const count = (value) => Number(value).toLocaleString();

// Slot time in the unit that reads best: seconds, minutes or hours. A short request takes hundredths of a
// second, which one decimal would show as nothing.
export function duration(seconds) {
  if (seconds < 10) return `${Number(seconds.toFixed(2))} s`;
  if (seconds < 60) return `${Number(seconds.toFixed(1))} s`;
  if (seconds < 3600) return `${Number((seconds / 60).toFixed(1))} min`;
  return `${Number((seconds / 3600).toFixed(1))} h`;
}

const FIGURES = [
  { label: "Requests", value: (row) => count(row.requests) },
  { label: "Prompt tokens", value: (row) => count(row.prompt_tokens) },
  { label: "Completion tokens", value: (row) => count(row.completion_tokens) },
  { label: "Slot time", value: (row) => duration(row.slot_seconds) },
  { label: "Cancelled", value: (row) => count(row.cancelled) },
  { label: "Errors", value: (row) => count(row.errors) },
];

function localDay(date) {
  const pad = (number) => String(number).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
}

// The first day of a period, as the API takes it (a day in the gateway's time zone).
export function periodStart(choice, now = new Date()) {
  if (choice === "month") return localDay(new Date(now.getFullYear(), now.getMonth(), 1));
  const days = Number(choice);
  return localDay(new Date(now.getFullYear(), now.getMonth(), now.getDate() - (days - 1)));
}

// Every day from `since` to today, with the reported days too: a day with no use is a visible gap, and the
// gateway's time zone may already be a day ahead of this browser's.
function daysFrom(since, rows) {
  const days = new Set(rows.map((row) => row.day));
  const today = localDay(new Date());
  const [year, month, day] = since.split("-").map(Number);
  for (let date = new Date(year, month - 1, day); localDay(date) <= today; date.setDate(date.getDate() + 1)) {
    days.add(localDay(date));
  }
  return [...days].sort();
}

// A table with a caption, a head, one row per group and the totals at the foot.
function table(caption, keyColumns, rows, totals) {
  const element = document.createElement("table");
  element.createCaption().textContent = caption;
  const columns = [...keyColumns, ...FIGURES];
  const head = element.createTHead().insertRow();
  for (const column of columns) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = column.label;
    if (!keyColumns.includes(column)) th.className = "number";
    head.append(th);
  }
  const body = element.createTBody();
  for (const row of rows) {
    const line = body.insertRow();
    for (const column of columns) {
      const cell = line.insertCell();
      cell.textContent = column.value(row);
      if (!keyColumns.includes(column)) cell.className = "number";
    }
  }
  if (totals && rows.length > 1) {
    const foot = element.createTFoot().insertRow();
    columns.forEach((column, index) => {
      const cell = foot.insertCell();
      if (index === 0) cell.textContent = "Total";
      else if (!keyColumns.includes(column)) {
        cell.textContent = column.value(totals);
        cell.className = "number";
      }
    });
  }
  const wrap = document.createElement("div");
  wrap.className = "table-wrap";
  wrap.append(element);
  return wrap;
}

const MODEL = { label: "Model", value: (row) => row.model ?? "" };
const DAY = { label: "Day", value: (row) => row.day };
const PERSON = { label: "Person", value: (row) => row.email ?? `user ${row.user ?? "deleted"}` };

function chart(title, labels, series, rows, format, width) {
  const byDay = new Map(rows.map((row) => [row.day, row]));
  const lines = series.map((one) => ({ ...one, values: labels.map((day) => byDay.get(day)?.[one.key] ?? 0) }));
  const figure = document.createElement("figure");
  figure.className = "chart-figure";
  const heading = document.createElement("figcaption");
  heading.textContent = title;
  const short = (day) => day.slice(5); // the month and day; the year is in the tooltip
  figure.append(heading, stackedBars({ title, labels, series: lines, format, width, short }));
  if (series.length > 1) figure.append(legend(series));
  return figure;
}

const LIMITS = [
  { key: "tokens", label: "Tokens", format: count },
  { key: "slot_seconds", label: "Slot time", format: duration },
  { key: "requests", label: "Requests", format: count },
];

// One meter per limit set: used of the limit, turning amber then red as it nears it.
function quotaLines(quota) {
  const lines = [];
  for (const limit of LIMITS) {
    const most = quota[limit.key];
    if (most === null || most === undefined) continue;
    const used = quota.used[limit.key];
    const line = document.createElement("div");
    line.className = "quota-line";
    const label = document.createElement("label");
    label.htmlFor = `quota-${limit.key}`;
    label.textContent = limit.label;
    const meter = document.createElement("meter");
    meter.id = `quota-${limit.key}`;
    Object.assign(meter, { min: 0, max: most, low: most * 0.75, high: most * 0.9, optimum: 0 });
    meter.value = Math.min(used, most);
    const said = document.createElement("span");
    said.textContent = `${limit.format(used)} of ${limit.format(most)} (${Math.round((used / most) * 100)}%)`;
    line.append(label, meter, said);
    lines.push(line);
  }
  return lines;
}

function showQuota($, quota) {
  $("#usage-quota").hidden = !quota;
  if (!quota) return;
  const resets = new Date(quota.resets_at).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  $("#usage-quota-period").textContent = `Per ${quota.period}; the counts start again on ${resets}.`;
  $("#usage-quota-lines").replaceChildren(...quotaLines(quota));
}

export function setUpUsage($, currentUser) {
  let asked = 0; // answers to an earlier choice that arrive late are dropped
  let shown = null; // what is on screen, to redraw the charts at a new width
  let shownTo = null; // whose session it was shown in

  function choice() {
    const everyone = currentUser()?.role === "admin" && $("#usage-scope").value === "everyone";
    const since = periodStart($("#usage-period").value);
    return { everyone, since, base: everyone ? "/admin/usage" : "/me/usage" };
  }

  function drawCharts() {
    if (!shown || $("#usage-view").hidden) return;
    const { days, since } = shown;
    const labels = daysFrom(since, days.rows);
    const width = $("#usage-charts").clientWidth || 640;
    const each = width >= 900 ? (width - 16) / 2 : width;
    $("#usage-charts").replaceChildren(
      chart("Tokens per day", labels, TOKENS, days.rows, count, each),
      chart("Slot time per day", labels, SLOT_TIME, days.rows, duration, each),
    );
  }

  function render(now, days, models, people, peopleModels) {
    shown = { since: now.since, days };
    drawCharts();
    $("#usage-empty").hidden = days.totals.requests > 0;
    const tables = [
      table(now.everyone ? "Everyone's use per model" : "Your use per model", [MODEL], models.rows, models.totals),
    ];
    if (people) {
      tables.push(table("Use per person", [PERSON], people.rows, people.totals));
      tables.push(table("Use per person and model", [PERSON, MODEL], peopleModels.rows, peopleModels.totals));
    }
    const perDay = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "The days as a table";
    perDay.append(summary, table("Use per day", [DAY], days.rows, days.totals));
    tables.push(perDay);
    $("#usage-tables").replaceChildren(...tables);
    showQuota($, now.everyone ? null : days.quota);
  }

  // After a sign-out and someone else's sign-in, the last person's figures must not show while theirs load.
  function forgetShown() {
    shown = null;
    for (const box of ["#usage-charts", "#usage-tables", "#usage-quota-lines"]) $(box).replaceChildren();
    $("#usage-quota").hidden = true;
    $("#usage-empty").hidden = true;
  }

  async function refresh() {
    if (shownTo !== currentUser()) forgetShown();
    shownTo = currentUser();
    const admin = currentUser()?.role === "admin";
    $("#usage-scope-field").hidden = !admin;
    const now = choice();
    const ask = (groups) => getJson(`${now.base}?since=${now.since}&group_by=${groups}`);
    const mine = ++asked;
    try {
      const answers = await Promise.all([
        ask("day"),
        ask("model"),
        now.everyone ? ask("user") : null,
        now.everyone ? ask("user,model") : null,
      ]);
      if (mine !== asked) return;
      render(now, ...answers);
      showError($, null);
    } catch (error) {
      if (mine === asked) showError($, error);
    }
  }

  async function downloadCsv() {
    const now = choice();
    const groups = now.everyone ? "user,model,day" : "model,day";
    try {
      const response = await request("GET", `${now.base}?since=${now.since}&group_by=${groups}&format=csv`);
      saveBlob(`usage-${now.everyone ? "everyone" : "mine"}-from-${now.since}.csv`, await response.blob());
    } catch (error) {
      showError($, error);
    }
  }

  $("#usage-period").addEventListener("change", refresh);
  $("#usage-scope").addEventListener("change", refresh);
  $("#usage-refresh").addEventListener("click", refresh);
  $("#usage-csv").addEventListener("click", downloadCsv);
  let pending = false;
  window.addEventListener("resize", () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      drawCharts();
    });
  });
  return refresh;
}

function showError($, error) {
  $("#usage-error").textContent = error ? error.message : "";
  $("#usage-error").hidden = !error;
}
