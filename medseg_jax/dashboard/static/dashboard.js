// The dashboard's pages: the runs table, a run's page, and the comparison of runs.
"use strict";
// Every 2 s, or every ?refresh= milliseconds (200 at least).
const REFRESH_MS = Math.max(200, Number(new URLSearchParams(location.search).get("refresh")) || 2000);
const CSRF = document.querySelector('meta[name="csrf"]').content;

function cell(text, numeric) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : text;
  if (numeric) { td.className = "num"; }
  return td;
}

function fixed(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : "";
}

function duration(seconds) {
  if (typeof seconds !== "number") { return ""; }
  const s = Math.round(seconds), h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

function statusBadge(element, status, why) {
  element.textContent = status;
  element.className = "status " + String(status).replace(/ /g, "-");
  element.title = why || "";
}

function runPath(name) {
  return name.split("/").map(encodeURIComponent).join("/");
}

async function getJSON(url) {
  const response = await fetch(url, {cache: "no-store"});
  if (!response.ok) { throw new Error(`${url}: ${response.status}`); }
  return response.json();
}

async function post(url) {
  const response = await fetch(url, {method: "POST", headers: {"X-Medseg-Csrf": CSRF}});
  const body = await response.json();
  return {ok: response.ok, body};
}

// The runs page.
let sortKey = "name", sortUp = true;
const selected = new Set();

function sortRows(rows) {
  return rows.sort((a, b) => {
    const x = a[sortKey], y = b[sortKey];
    const order = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined
        ? -1 : x < y ? -1 : 1;
    return sortUp ? order : -order;
  });
}

async function refreshRuns() {
  const rows = sortRows(await getJSON("/api/runs"));
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(...rows.map(r => {
    const tr = document.createElement("tr");
    tr.dataset.run = r.name;
    const pick = document.createElement("input");
    pick.type = "checkbox";
    pick.checked = selected.has(r.name);
    pick.onchange = () => {
      pick.checked ? selected.add(r.name) : selected.delete(r.name);
      document.getElementById("compare").disabled = selected.size < 1;
    };
    const first = document.createElement("td");
    first.appendChild(pick);
    const link = document.createElement("a");
    link.href = "/run/" + runPath(r.name);
    link.textContent = r.name;
    const name = document.createElement("td");
    name.appendChild(link);
    const status = document.createElement("td");
    const badge = document.createElement("span");
    statusBadge(badge, r.status, r.why);
    status.appendChild(badge);
    tr.append(first, name, status, cell(r.config), cell(r.network),
              cell(r.devices ? `${r.devices} × ${r.hosts || 1}` : ""),
              cell(`${r.step} / ${r.total_steps ?? "?"}`, true), cell(duration(r.eta_seconds), true),
              cell(fixed(r.loss, 4), true), cell(fixed(r.best_val_dice, 4), true),
              cell(fixed(r.test_dice, 4), true));
    return tr;
  }));
  document.getElementById("empty").hidden = rows.length > 0;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function initRuns() {
  document.querySelectorAll("th[data-key]").forEach(th => th.onclick = () => {
    sortUp = sortKey === th.dataset.key ? !sortUp : true;
    sortKey = th.dataset.key;
    document.querySelectorAll("th").forEach(h => h.classList.remove("sorted", "up"));
    th.classList.add("sorted");
    if (sortUp) { th.classList.add("up"); }
    refreshRuns();
  });
  document.getElementById("compare").onclick = () => {
    location.href = "/compare?runs=" + [...selected].map(encodeURIComponent).join(",");
  };
  const loop = () => refreshRuns().catch(() => {}).finally(() => setTimeout(loop, REFRESH_MS));
  loop();
}

// A run's page.
function runName() {
  return decodeURIComponent(location.pathname.slice("/run/".length));
}

function showRun(detail) {
  const s = detail.summary;
  statusBadge(document.getElementById("status"), s.status, s.why);
  document.getElementById("facts").replaceChildren(...[
      ["config", s.config], ["network", s.network],
      ["devices × hosts", s.devices ? `${s.devices} × ${s.hosts || 1}` : ""],
      ["step", `${s.step} / ${s.total_steps ?? "?"}`], ["ETA", duration(s.eta_seconds)],
      ["loss", fixed(s.loss, 4)], ["best val Dice", fixed(s.best_val_dice, 4)],
      ["test Dice", fixed(s.test_dice, 4)], ["why", s.why]].filter(([, v]) => v).map(([k, v]) => {
    const span = document.createElement("span");
    span.textContent = `${k}: ${v ?? ""}`;
    return span;
  }));
  document.getElementById("stop").hidden = s.status !== "running";
  const resumable = ["stopped", "failed", "lost process"].includes(s.status) && detail.resume;
  document.getElementById("resume").hidden = !resumable;
  document.getElementById("log").textContent = detail.log;
  document.getElementById("config").textContent = JSON.stringify(detail.config, null, 2);
  document.getElementById("manifest").textContent = JSON.stringify(detail.manifest, null, 2);
  const montage = document.getElementById("montage");
  if (detail.montage && montage.dataset.src !== detail.montage) {
    montage.dataset.src = detail.montage;
    montage.src = detail.montage;
  }
  montage.hidden = !detail.montage;
  document.getElementById("no-montage").hidden = !!detail.montage;
  const now = Date.now() / 1000;
  document.querySelector("#processes tbody").replaceChildren(...detail.processes.map(p => {
    const tr = document.createElement("tr");
    const end = p.end ? `${p.end.reason} (exit ${p.end.exit_code}) ${p.end.message || ""}` : "";
    tr.append(cell(p.process, true), cell(p.host), cell(p.pid, true),
              cell(p.heartbeat ? `${duration(Math.max(0, now - p.heartbeat))} ago` : ""), cell(end));
    return tr;
  }));
  document.querySelector("#checkpoints tbody").replaceChildren(...detail.checkpoints.map(c => {
    const tr = document.createElement("tr");
    tr.append(cell(c.step, true), cell(fixed((c.metrics || {}).dice, 4), true));
    return tr;
  }));
  window.lastDetail = detail;
}

function showCurves(curves) {
  drawChart(document.getElementById("chart-loss"), curves.loss);
  drawChart(document.getElementById("chart-lr"), curves.learning_rate);
  drawChart(document.getElementById("chart-val"), curves.validation);
  drawChart(document.getElementById("chart-throughput"), curves.throughput);
  const hosts = document.getElementById("hosts");
  hosts.replaceChildren(...Object.entries(curves.system).map(([host, quantities]) => {
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = `${host}: CPU %, memory %, GPU utilisation % where present`;
    const chart = document.createElement("div");
    chart.className = "chart";
    const shown = {};
    for (const [k, v] of Object.entries(quantities)) {
      if (k === "cpu_percent" || k === "host_memory_percent" || k.endsWith("utilisation_percent")) {
        shown[k] = v;
      }
    }
    figure.append(caption, chart);
    drawChart(chart, shown, {width: 360, height: 160});
    return figure;
  }));
}

async function act(kind, question) {
  if (!confirm(question)) { return; }
  const message = document.getElementById("message");
  const {ok, body} = await post(`/api/${kind}/` + runPath(runName()));
  message.textContent = ok ? (kind === "stop" ? "stop requested: the run stops after its current step"
                                             : `started again: ${body.shell}`) : body.error;
  if (!ok && body.error && kind === "resume" && window.lastDetail && window.lastDetail.resume) {
    document.getElementById("command").hidden = false;
    document.getElementById("command-line").textContent = window.lastDetail.resume.shell;
  }
}

function initRun() {
  const name = runName();
  document.getElementById("name").textContent = name;
  document.title = `medseg_jax: ${name}`;
  document.getElementById("stop").onclick = () => act(
      "stop", `Stop ${name} after its current step, with a checkpoint?`);
  document.getElementById("resume").onclick = () => act(
      "resume", `Start ${name} again with the command that started it?`);
  const loop = () => Promise.all([
      getJSON("/api/run/" + runPath(name)).then(showRun),
      getJSON("/api/curves/" + runPath(name)).then(showCurves)]).catch(() => {})
      .finally(() => setTimeout(loop, REFRESH_MS));
  loop();
}

// The comparison of runs.
async function refreshCompare(names) {
  const loss = {}, val = {}, lr = {};
  const rows = [];
  for (const name of names) {
    const [curves, detail] = await Promise.all([getJSON("/api/curves/" + runPath(name)),
                                                getJSON("/api/run/" + runPath(name))]);
    loss[name] = curves.loss["ema 0.99"] || [];
    val[name] = curves.validation.dice || [];
    lr[name] = curves.learning_rate["learning rate"] || [];
    const s = detail.summary;
    const tr = document.createElement("tr");
    tr.append(cell(name), cell(s.status), cell(s.devices), cell(`${s.step} / ${s.total_steps ?? "?"}`),
              cell(fixed(s.best_val_dice, 4), true), cell(fixed(s.test_dice, 4), true));
    rows.push(tr);
  }
  drawChart(document.getElementById("chart-loss"), loss);
  drawChart(document.getElementById("chart-val"), val);
  drawChart(document.getElementById("chart-lr"), lr);
  document.querySelector("#final tbody").replaceChildren(...rows);
}

function initCompare() {
  const names = (new URLSearchParams(location.search).get("runs") || "").split(",").filter(Boolean);
  const loop = () => refreshCompare(names).catch(() => {})
      .finally(() => setTimeout(loop, REFRESH_MS));
  loop();
}

({runs: initRuns, run: initRun, compare: initCompare})[document.body.dataset.page]();
