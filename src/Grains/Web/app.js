// The run page: polls the silo's read-only JSON (api/runs, api/runs/{id}) every two seconds and redraws.
// Every text goes in through textContent; the charts are SVG drawn here (no library, no CDN).
"use strict";

const PAGE = 50, POLL_MS = 2000, SVG = "http://www.w3.org/2000/svg";
let runsOffset = 0, eventsOffset = 0, selected = decodeURIComponent(location.hash.slice(1)) || null;

function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows.map(cells => {
    const tr = el("tr");
    for (const c of cells) tr.append(c instanceof Node ? c : el("td", {}, c));
    return tr;
  }));
}

const pct = x => x === null || x === undefined ? "" : (100 * x).toFixed(2) + "%";
const num = x => x === null || x === undefined ? "" : Math.round(x).toLocaleString("en-US");
const time = t => new Date(t).toISOString().replace("T", " ").slice(0, 19);

async function getJson(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error((await r.text()).trim() || r.status);
  return r.json();
}

async function pollRuns() {
  const data = await getJson(`api/runs?offset=${runsOffset}&limit=${PAGE}`);
  document.getElementById("runs-total").textContent = `(${data.total})`;
  document.getElementById("runs-page").textContent =
    data.total ? `${data.offset + 1}–${data.offset + data.runs.length} of ${data.total}` : "none yet";
  document.getElementById("runs-prev").disabled = data.offset === 0;
  document.getElementById("runs-next").disabled = data.offset + data.runs.length >= data.total;
  const tbody = document.querySelector("#runs-table tbody");
  fill(tbody, data.runs.map(r => [r.id, el("td", { class: "state-" + r.state }, r.state), `${r.epochsDone}/${r.epochs}`,
    pct(r.accuracy), num(r.samplesPerSecond), time(r.updated)]));
  [...tbody.rows].forEach((tr, i) => {
    const id = data.runs[i].id;
    if (id === selected) tr.classList.add("selected");
    tr.onclick = () => { selected = id; eventsOffset = 0; location.hash = encodeURIComponent(id); refresh(); };
  });
  if (!selected && data.runs.length) selected = data.runs[0].id;
}

function chart(svg, series, format) {
  // series: [{ cls, points: [[x, y], ...] }]; x = epoch.
  const W = 360, H = 200, L = 52, R = 10, T = 10, B = 24;
  const all = series.flatMap(s => s.points);
  svg.replaceChildren();
  if (!all.length) { svg.append(el("svg:text", { x: L, y: H / 2 }, "no finished epoch yet")); return; }
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const px = x => L + (x - x0) / (x1 - x0) * (W - L - R), py = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  svg.append(el("svg:line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }), el("svg:line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (const y of [y0, (y0 + y1) / 2, y1]) svg.append(el("svg:text", { x: 2, y: py(y) + 3 }, format(y)));
  const ticks = [...new Set(xs)], every = Math.ceil(ticks.length / 10);   // at most about ten epoch labels
  ticks.filter((_, i) => i % every === 0 || i === ticks.length - 1).forEach(x => svg.append(el("svg:text", { x: px(x) - 3, y: H - 8 }, x)));
  for (const s of series) {
    if (!s.points.length) continue;
    svg.append(el("svg:polyline", { class: s.cls, "data-points": s.points.length, points: s.points.map(p => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ") }));
    for (const p of s.points) svg.append(el("svg:circle", { class: s.cls, cx: px(p[0]).toFixed(1), cy: py(p[1]).toFixed(1), r: 3 }));
  }
}

async function pollRun() {
  const section = document.getElementById("run");
  if (!selected) { section.hidden = true; return; }
  let run;
  try {
    run = await getJson(`api/runs/${encodeURIComponent(selected)}?offset=${eventsOffset}&limit=${PAGE}`);
  } catch (e) {
    section.hidden = false;
    document.getElementById("run-title").textContent = `run ${selected}`;
    document.getElementById("run-summary").textContent = String(e.message);
    return;
  }
  section.hidden = false;
  document.getElementById("run-title").textContent = `run ${run.id}`;
  const progress = run.state === "running" ? `, epoch ${run.epoch + 1}/${run.epochs}, step ${run.stepInEpoch}/${run.stepsPerEpoch}` : "";
  document.getElementById("run-summary").textContent =
    `${run.state}${progress}; ${run.model || ""}; step ${run.step}` + (run.error ? `; error: ${run.error}` : "");
  const c = run.curve;
  chart(document.getElementById("chart-loss"), [
    { cls: "train", points: c.map(e => [e.epoch, e.trainLoss]) },
    { cls: "test", points: c.map(e => [e.epoch, e.testLoss]) }], y => y.toFixed(3));
  chart(document.getElementById("chart-accuracy"), [{ cls: "test", points: c.map(e => [e.epoch, e.testAccuracy]) }], y => (100 * y).toFixed(1) + "%");
  chart(document.getElementById("chart-rate"), [{ cls: "train", points: c.map(e => [e.epoch, e.samplesPerSecond]) }], y => num(y));
  document.getElementById("workers-total").textContent = run.workers ? `(${run.workers} over ${run.workerSilos.length} silos)` : "";
  // Per-worker compute times once the coordinator has them (after a few windows); until then the silos alone.
  const stats = run.workerStats || [];
  const ms = s => (1000 * s).toFixed(s < 0.01 ? 2 : 0);
  fill(document.querySelector("#workers-table thead"), [stats.length
    ? ["#", "silo", "blocks", "median ms", "p95 ms", "slow?"].map(h => el("th", {}, h))
    : [el("th", {}, "worker silo")]]);
  fill(document.querySelector("#workers-table tbody"), stats.length
    ? stats.map(w => [w.id, w.silo, w.blocks, ms(w.computeMedianSeconds), ms(w.computeP95Seconds),
        el("td", w.straggler ? { class: "straggler", title: w.note } : {}, w.straggler ? w.note : "")])
    : run.workerSilos.map(silo => [silo]));
  fill(document.querySelector("#shards-table tbody"), run.shards.map(s => [s.index, s.silo]));
  document.getElementById("coordinator").textContent = run.coordinator ? `coordinator on ${run.coordinator}` : "";
  document.getElementById("events-total").textContent = `(${run.eventCount}, newest first)`;
  document.getElementById("events-page").textContent = run.eventCount ? `${run.eventOffset + 1}–${run.eventOffset + run.events.length}` : "";
  document.getElementById("events-prev").disabled = run.eventOffset === 0;
  document.getElementById("events-next").disabled = run.eventOffset + run.events.length >= run.eventCount;
  fill(document.querySelector("#events-table tbody"), run.events.map(e => [time(e.time), e.kind, el("td", { class: "message" }, e.message)]));
}

async function refresh() {
  try {
    await pollRuns();
    await pollRun();
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
  } catch (e) {
    document.getElementById("updated").textContent = "cannot reach the silo: " + e.message;
  }
}

document.getElementById("runs-prev").onclick = () => { runsOffset = Math.max(0, runsOffset - PAGE); refresh(); };
document.getElementById("runs-next").onclick = () => { runsOffset += PAGE; refresh(); };
document.getElementById("events-prev").onclick = () => { eventsOffset = Math.max(0, eventsOffset - PAGE); refresh(); };
document.getElementById("events-next").onclick = () => { eventsOffset += PAGE; refresh(); };
// The next poll is scheduled when this one has ended: a slow silo gets one request at a time from a tab, not a queue.
async function loop() {
  await refresh();
  setTimeout(loop, POLL_MS);
}
loop();
