// Bar charts drawn as SVG with DOM methods: no library, and nothing parsed as markup, so a label (a model
// name, an email) can only ever be text. Colours come from style.css classes, so both themes apply.

const SVG = "http://www.w3.org/2000/svg";
const HEIGHT = 200;
const MARGIN = { top: 12, right: 8, bottom: 28, left: 56 };

function svgElement(name, attributes = {}, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

function tick(x, y, anchor, text) {
  return svgElement("text", { class: "tick", x, y, "text-anchor": anchor }, text);
}

// A round top for the axis: 1, 2 or 5 times a power of ten, at least `value`.
export function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((step) => step * power).find((top) => top >= value);
}

// Stacked bars, one per label; `series` is [{name, className, values}], each value one label's. `format`
// writes a value for the axis and the tooltips, `short` a label under its bar. Returns the <svg>, titled for
// screen readers (who find the same numbers in the table next to it), with a tooltip per bar.
export function stackedBars({ title, labels, series, format, width, short = (label) => label }) {
  const chartWidth = Math.max(width, 240);
  const svg = svgElement("svg", {
    class: "chart",
    role: "img",
    width: chartWidth,
    height: HEIGHT,
    viewBox: `0 0 ${chartWidth} ${HEIGHT}`,
  });
  svg.append(svgElement("title", {}, title));
  const plotWidth = chartWidth - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const totals = labels.map((_, index) => series.reduce((sum, one) => sum + (one.values[index] || 0), 0));
  const top = niceCeiling(Math.max(0, ...totals));
  const y = (value) => MARGIN.top + plotHeight - (value / top) * plotHeight;

  for (const fraction of [0, 0.5, 1]) {
    const level = y(top * fraction);
    svg.append(
      svgElement("line", { class: "grid", x1: MARGIN.left, x2: chartWidth - MARGIN.right, y1: level, y2: level }),
      tick(MARGIN.left - 6, level + 4, "end", format(top * fraction)),
    );
  }

  const slot = plotWidth / Math.max(labels.length, 1);
  const barWidth = Math.max(Math.min(slot * 0.7, 40), 1);
  // Label every day when they fit, else every few days: about one label per 56 pixels.
  const labelEvery = Math.max(1, Math.ceil(labels.length / Math.max(1, Math.floor(plotWidth / 56))));
  labels.forEach((label, index) => {
    const x = MARGIN.left + slot * index + (slot - barWidth) / 2;
    const group = svgElement("g", { class: "bar" });
    const parts = series.map((one) => `${one.name}: ${format(one.values[index] || 0)}`);
    group.append(svgElement("title", {}, `${label}: ${parts.join(", ")}`));
    let base = 0;
    for (const one of series) {
      const value = one.values[index] || 0;
      if (value > 0) {
        const height = Math.max(y(base) - y(base + value), 1);
        group.append(
          svgElement("rect", { class: one.className, x, y: y(base) - height, width: barWidth, height }),
        );
      }
      base += value;
    }
    svg.append(group);
    if (index % labelEvery === 0) {
      svg.append(tick(x + barWidth / 2, HEIGHT - 8, "middle", short(label)));
    }
  });
  return svg;
}

// The colour key under a chart: one swatch and name per series.
export function legend(series) {
  const list = document.createElement("ul");
  list.className = "legend";
  for (const one of series) {
    const item = document.createElement("li");
    const swatch = svgElement("svg", { width: 12, height: 12, "aria-hidden": "true" });
    swatch.append(svgElement("rect", { class: one.className, width: 12, height: 12 }));
    item.append(swatch, document.createTextNode(one.name));
    list.append(item);
  }
  return list;
}
