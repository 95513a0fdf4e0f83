// Review queue: one frame at a time, labelled with one key press through the JSON API.
let current = null;
let showHeat = true;

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
}

async function label(value) {
  if (!current) return;
  const r = await fetch(`/api/frames/${current.id}/label`, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({label: value}),
  });
  const body = await r.json();
  document.getElementById("status").textContent = r.ok ? `labelled ${body.label || body.kind}` : body.detail;
  await loadNext();
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT") return;
  const n = parseInt(e.key, 10);
  if (n >= 1 && n <= CLASSES.length) label(CLASSES[n - 1]);
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
  if (name) label("new:" + name);
});

loadNext();
