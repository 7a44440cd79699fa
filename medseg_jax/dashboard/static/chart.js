// A small line chart in SVG: several named series of [x, y] points, axes with a few
// ticks, a legend. No library: nothing is fetched from the internet.
"use strict";
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                 "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { return [lo]; }
  const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) { ticks.push(t); }
  return ticks;
}

function formatTick(v) {
  if (v === 0) { return "0"; }
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(1) : String(Number(v.toPrecision(3)));
}

function drawChart(element, series, options = {}) {
  const width = options.width || 420, height = options.height || 220;
  const left = 52, right = 10, top = 10, bottom = 26;
  const names = Object.keys(series).filter(n => series[n].length > 0);
  const points = names.flatMap(n => series[n]);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height + 18 * Math.ceil(names.length / 3));
  element.replaceChildren(svg);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) { node.setAttribute(k, v); }
    if (text !== undefined) { node.textContent = text; }
    svg.appendChild(node);
    return node;
  };
  if (points.length === 0) {
    add("text", {x: left, y: height / 2, fill: "#888"}, "no points yet");
    return;
  }
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { const pad = Math.abs(y0) * 0.1 || 0.5; y0 -= pad; y1 += pad; }
  const sx = x => left + (x - x0) / (x1 - x0) * (width - left - right);
  const sy = y => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  for (const t of niceTicks(y0, y1, 4)) {
    add("line", {x1: left, x2: width - right, y1: sy(t), y2: sy(t), stroke: "#eee"});
    add("text", {x: left - 4, y: sy(t) + 4, "text-anchor": "end", "font-size": 10}, formatTick(t));
  }
  for (const t of niceTicks(x0, x1, 5)) {
    add("text", {x: sx(t), y: height - 8, "text-anchor": "middle", "font-size": 10}, formatTick(t));
  }
  add("rect", {x: left, y: top, width: width - left - right, height: height - top - bottom,
               fill: "none", stroke: "#bbb"});
  names.forEach((name, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const d = series[name].map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " "
                                         + sy(p[1]).toFixed(1)).join(" ");
    add("path", {d, fill: "none", stroke: colour, "stroke-width": 1.5, "data-series": name,
                 "data-points": series[name].length});
    const lx = left + (i % 3) * 130, ly = height + 14 + 18 * Math.floor(i / 3);
    add("rect", {x: lx, y: ly - 9, width: 10, height: 10, fill: colour});
    add("text", {x: lx + 14, y: ly, "font-size": 11}, name);
  });
}
