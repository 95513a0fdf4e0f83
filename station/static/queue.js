// Review queue. By default one incident at a time (the flagged frames that belong together, as a grid of
// thumbnails): one key labels all its frames; `o` opens them one by one. `?view=frames` shows single frames.
// A detector group's frame shows its kept boxes: a click marks one wrong, a drag boxes a missed object, `c` sends.
const VIEW = new URLSearchParams(location.search).get("view") === "frames" ? "frames" : "incidents";
let current = null;  // the frame on screen (frame view)
let incident = null;  // the incident on screen (incident view)
let within = [];  // an opened incident's frames still to label one by one
let showHeat = true;
let boxes = [];  // the frame's boxes as the operator now sees them: {class, box, wrong, drawn}
let pen = CLASSES[0];  // the class a drawn box gets
let drawnLast = null;
const SVG = "http://www.w3.org/2000/svg";

function why(details) {
  return details.map((d) => d.threshold === undefined || d.threshold === null
    ? d.reason : `${d.reason}: ${d.value} vs ${d.threshold}`).join("; ");
}

function when(ts) {  // local, human-readable; the ISO time in the tooltip
  const d = new Date(ts * 1000);
  return {text: d.toLocaleString(), iso: d.toISOString()};
}

function show(which) {
  document.getElementById("card").hidden = which !== "frame";
  document.getElementById("incident").hidden = which !== "incident";
  document.getElementById("empty").hidden = which !== "empty";
}

async function loadNext() {
  if (VIEW === "incidents" && !within.length) return loadIncident();
  let body;
  if (within.length) {
    const r = await fetch(`/api/frames/${within[0]}`);
    const f = await r.json();
    if (!r.ok || f.label_kind) { within.shift(); return loadNext(); }  // labelled meanwhile: skip it
    body = {frames: [f], counts: (await (await fetch(`/api/queue?limit=1&group=${encodeURIComponent(GROUP)}`)).json()).counts};
  } else {
    body = await (await fetch(`/api/queue?limit=1&group=${encodeURIComponent(GROUP)}`)).json();
  }
  document.getElementById("remaining").textContent = body.counts.unlabelled;
  current = body.frames[0] || null;
  show(current ? "frame" : "empty");
  if (!current) return;
  document.getElementById("image").src = current.image;
  const heat = document.getElementById("heat");
  heat.hidden = !current.heatmap || !showHeat;
  if (current.heatmap) heat.src = current.heatmap;
  document.getElementById("why").textContent = why(current.details) || "-";
  document.getElementById("device").textContent = current.device;
  document.getElementById("decision").textContent = current.audit ? "accept (audit sample)" : current.decision;
  document.getElementById("reasons").textContent = current.reasons.join(", ");
  document.getElementById("predicted").textContent = current.predicted || "-";
  document.getElementById("confidence").textContent = current.confidence == null ? "-" : current.confidence.toFixed(3);
  document.getElementById("ood").textContent = current.ood_score == null ? "-" : current.ood_score.toFixed(2);
  document.getElementById("source").textContent = current.source || "-";
  const t = when(current.ts);
  document.getElementById("taken").textContent = t.text;
  document.getElementById("taken").title = t.iso;
  boxes = (current.boxes || []).map((b) => ({cls: b.class, box: b.box, p: b.p, wrong: false, drawn: false}));
  drawnLast = null;
  drawBoxes();
}

function filters() {  // the queue page's own filters (device, reason, decision, since, until), passed on
  const page = new URLSearchParams(location.search), out = new URLSearchParams();
  for (const k of ["device", "reason", "decision", "since", "until"]) if (page.get(k)) out.set(k, page.get(k));
  return out.toString() ? "&" + out.toString() : "";
}

async function loadIncident() {
  const body = await (await fetch(`/api/incidents?limit=1&group=${encodeURIComponent(GROUP)}${filters()}`)).json();
  document.getElementById("remaining").textContent = body.counts.unlabelled;
  incident = body.incidents[0] || null;
  current = null;
  show(incident ? "incident" : "empty");
  if (!incident) return;
  document.getElementById("inc-count").textContent = incident.count;
  document.getElementById("inc-devices").textContent = incident.devices.join(", ");
  document.getElementById("inc-reasons").textContent = incident.reasons.join(", ");
  document.getElementById("inc-predicted").textContent = incident.predicted || "-";
  const a = when(incident.first_ts), b = when(incident.last_ts);
  const span = document.getElementById("inc-when");
  span.textContent = incident.count > 1 ? `${a.text} – ${b.text}` : a.text;
  span.title = `${a.iso} – ${b.iso}`;
  const grid = document.getElementById("thumbs");
  grid.replaceChildren(...incident.preview.map((f) => {
    const img = document.createElement("img");
    img.src = f.image;
    img.alt = f.reasons.join(", ");
    img.title = `${f.device} · ${f.reasons.join(", ")} · ${when(f.ts).text}`;
    return img;
  }));
  document.getElementById("inc-more").textContent =
    incident.count > incident.preview.length ? `+ ${incident.count - incident.preview.length} more` : "";
}

function drawBoxes() {
  const svg = document.getElementById("boxes");
  const shown = !!(current && current.boxes && current.size);
  svg.toggleAttribute("hidden", !shown);  // an SVG element has no `hidden` property, only the attribute
  if (!shown) return;
  if (document.getElementById("pen")) document.getElementById("pen").textContent = pen;
  svg.setAttribute("viewBox", `0 0 ${current.size[0]} ${current.size[1]}`);
  svg.replaceChildren();
  boxes.forEach((b, i) => {
    const r = document.createElementNS(SVG, "rect");
    const [x1, y1, x2, y2] = b.box;
    r.setAttribute("x", x1); r.setAttribute("y", y1);
    r.setAttribute("width", x2 - x1); r.setAttribute("height", y2 - y1);
    r.setAttribute("class", b.wrong ? "wrong" : b.drawn ? "drawn" : "kept");
    r.dataset.index = i;
    r.addEventListener("click", (e) => { e.stopPropagation(); if (!b.drawn) { b.wrong = !b.wrong; drawBoxes(); } });
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x1 + 2); t.setAttribute("y", Math.max(y1 - 3, 10));
    t.textContent = b.drawn ? `${b.cls} (missed)` : `${b.cls} ${b.p.toFixed(2)}${b.wrong ? " wrong" : ""}`;
    svg.append(r, t);
  });
}

function framePoint(e) {
  const svg = document.getElementById("boxes");
  const rect = svg.getBoundingClientRect();
  return [(e.clientX - rect.left) / rect.width * current.size[0], (e.clientY - rect.top) / rect.height * current.size[1]];
}

let dragFrom = null;
document.getElementById("boxes").addEventListener("mousedown", (e) => {
  if (e.target.tagName === "rect") return;
  dragFrom = framePoint(e);
  e.preventDefault();
});
document.addEventListener("mouseup", (e) => {
  if (!dragFrom || !current) return;
  const [ax, ay] = dragFrom, [bx, by] = framePoint(e);
  dragFrom = null;
  const clamp = (v, hi) => Math.round(Math.min(Math.max(v, 0), hi) * 10) / 10;
  const box = [clamp(Math.min(ax, bx), current.size[0]), clamp(Math.min(ay, by), current.size[1]),
               clamp(Math.max(ax, bx), current.size[0]), clamp(Math.max(ay, by), current.size[1])];
  if (box[2] - box[0] < 3 || box[3] - box[1] < 3) return;  // a click, not a box
  drawnLast = {cls: pen, box, wrong: false, drawn: true};
  boxes.push(drawnLast);
  drawBoxes();
});

async function sendBoxes() {
  const truth = boxes.filter((b) => !b.wrong).map((b) => ({class: b.cls, box: b.box}));
  await post({boxes: truth});
}

function choosePen(name) {
  pen = name;
  if (drawnLast) drawnLast.cls = name;  // a number right after drawing names that box
  drawBoxes();
}

async function label(value) {
  await post({label: value});
}

async function post(request) {
  const status = document.getElementById("status");
  if (incident && !current) {  // the whole incident
    const r = await fetch("/api/incidents/label", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({...request, frames: incident.frame_ids}),
    });
    const body = await r.json();
    status.textContent = r.ok ? `labelled ${body.labelled} frame(s) ${request.label || ""}` : body.detail;
    await loadNext();
    return;
  }
  if (!current) return;
  const r = await fetch(`/api/frames/${current.id}/label`, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(request),
  });
  const body = await r.json();
  const what = body.kind === "boxes" ? `${body.label.length} box(es)` : body.label || body.kind;
  status.textContent = r.ok ? `labelled ${what}` : body.detail;
  if (r.ok && within.length && within[0] === current.id) within.shift();
  await loadNext();
}

function openIncident() {  // its frames one by one (to split it)
  if (!incident || current) return;
  within = [...incident.frame_ids];
  incident = null;
  loadNext();
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT") return;
  const n = parseInt(e.key, 10);
  if (e.key === "o") openIncident();
  else if (DETECTOR && current && n >= 1 && n <= CLASSES.length) choosePen(CLASSES[n - 1]);
  else if (DETECTOR && !current) { if (e.key === "c") label("correct"); else if (e.key === "g") label("garbage"); }
  else if (n >= 1 && n <= CLASSES.length) label(CLASSES[n - 1]);
  else if (DETECTOR && current && (e.key === "c" || e.key === "Enter")) sendBoxes();
  else if (DETECTOR && current && e.key === "u") {
    const i = boxes.map((b) => b.drawn).lastIndexOf(true);
    if (i >= 0) boxes.splice(i, 1);
    drawnLast = null;
    drawBoxes();
  }
  else if (e.key === "c") label("correct");
  else if (e.key === "g") label("garbage");
  else if (e.key === "h") {
    showHeat = !showHeat;
    document.getElementById("heat").hidden = !showHeat || !(current && current.heatmap);
  }
  else if (e.key === "n") {
    const form = document.getElementById("newform");
    form.hidden = false;
    e.preventDefault();
    document.getElementById("newname").focus();
  }
});

document.getElementById("newform").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = document.getElementById("newname").value.trim();
  document.getElementById("newform").hidden = true;
  if (name && DETECTOR && current) choosePen("new:" + name);
  else if (name) label("new:" + name);
});

loadNext();
