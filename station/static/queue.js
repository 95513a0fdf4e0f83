// Review queue: one frame at a time, labelled with one key press through the JSON API. A detector group's frame
// shows its kept boxes: a click marks one wrong, a drag boxes an object the camera missed, `c` sends the boxes.
let current = null;
let showHeat = true;
let boxes = [];  // the frame's boxes as the operator now sees them: {class, box, wrong, drawn}
let pen = CLASSES[0];  // the class a drawn box gets
let drawnLast = null;
const SVG = "http://www.w3.org/2000/svg";

function why(details) {
  return details.map((d) => d.threshold === undefined || d.threshold === null
    ? d.reason : `${d.reason}: ${d.value} vs ${d.threshold}`).join("; ");
}

async function loadNext() {
  const r = await fetch(`/api/queue?limit=1&group=${encodeURIComponent(GROUP)}`);
  const body = await r.json();
  document.getElementById("remaining").textContent = body.counts.unlabelled;
  current = body.frames[0] || null;
  document.getElementById("card").hidden = !current;
  document.getElementById("empty").hidden = !!current;
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
  boxes = (current.boxes || []).map((b) => ({cls: b.class, box: b.box, p: b.p, wrong: false, drawn: false}));
  drawnLast = null;
  drawBoxes();
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
  if (!current) return;
  const r = await fetch(`/api/frames/${current.id}/label`, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(request),
  });
  const body = await r.json();
  const what = body.kind === "boxes" ? `${body.label.length} box(es)` : body.label || body.kind;
  document.getElementById("status").textContent = r.ok ? `labelled ${what}` : body.detail;
  await loadNext();
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT") return;
  const n = parseInt(e.key, 10);
  if (DETECTOR && n >= 1 && n <= CLASSES.length) choosePen(CLASSES[n - 1]);
  else if (n >= 1 && n <= CLASSES.length) label(CLASSES[n - 1]);
  else if (DETECTOR && (e.key === "c" || e.key === "Enter")) sendBoxes();
  else if (DETECTOR && e.key === "u") {
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
  if (name && DETECTOR) choosePen("new:" + name);
  else if (name) label("new:" + name);
});

loadNext();
