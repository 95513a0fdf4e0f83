// The fleet page's charts (uPlot, served with the station): per device, the flag rate, the outbox depth and each
// drift statistic against its alarm line; the group's review backlog; gate versions as dashed markers.
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
const CHARTS = {};  // title -> {chart, points}: read by the browser test

function markers(gates) {  // a uPlot plugin: a dashed vertical line per gate version
  return {hooks: {draw: [(u) => {
    const ctx = u.ctx;
    ctx.save();
    ctx.setLineDash([5, 4]);
    ctx.strokeStyle = "#888";
    ctx.fillStyle = "#555";
    ctx.font = "11px system-ui";
    for (const g of gates) {
      const x = u.valToPos(g.ts, "x", true);
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
      ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
      ctx.fillText(`${g.version}${g.device ? " on " + g.device : ""}`, x + 3, u.bbox.top + 12);
    }
    ctx.restore();
  }]}};
}

function draw(id, title, xs, series, gates, yLabel) {
  const el = document.getElementById(id);
  el.replaceChildren();
  const points = series.reduce((n, s) => n + s.values.filter((v) => v !== null && v !== undefined).length, 0);
  const opts = {
    title, width: Math.min(900, el.parentElement.clientWidth || 900), height: 220, plugins: [markers(gates)],
    scales: {x: {time: true}}, axes: [{}, {label: yLabel}],
    series: [{}, ...series.map((s, i) => ({label: s.label, stroke: s.stroke || COLOURS[i % COLOURS.length],
                                           dash: s.dash, spanGaps: true, width: s.dash ? 1 : 2}))],
  };
  CHARTS[title] = {chart: new uPlot(opts, [xs, ...series.map((s) => s.values)], el), points};
}

// several devices' series on one time axis: the union of their sample times, nulls where a device has none
function merge(devices, pick) {
  const times = [...new Set(Object.values(devices).flatMap((d) => d.ts))].sort((a, b) => a - b);
  const index = new Map(times.map((t, i) => [t, i]));
  const out = [];
  for (const [name, d] of Object.entries(devices)) {
    for (const [label, values] of pick(name, d)) {
      const col = new Array(times.length).fill(null);
      d.ts.forEach((t, i) => { col[index.get(t)] = values[i]; });
      out.push({label, values: col});
    }
  }
  return {times, series: out};
}

async function load() {
  const minutes = document.getElementById("minutes").value;
  const r = await fetch(`/api/series?group=${encodeURIComponent(GROUP)}&minutes=${minutes}`);
  const s = await r.json();
  const empty = !Object.keys(s.devices).length;
  document.getElementById("charts-empty").hidden = !empty;
  const flag = merge(s.devices, (name, d) => [[name, d.flag_rate]]);
  draw("chart-flag", "flag rate (review + reject, per stats interval)", flag.times, flag.series, s.gates, "share");
  draw("chart-backlog", "review backlog (unlabelled frames)", s.backlog.ts,
       [{label: GROUP, values: s.backlog.unlabelled}], s.gates, "frames");
  const drift = merge(s.devices, (name, d) => Object.entries(d.drift).map(([sig, v]) => [`${name} ${sig}`, v]));
  const alarms = [...new Set(Object.values(s.devices).flatMap((d) => Object.values(d.alarm)).filter((v) => v))];
  for (const h of drift.times.length ? alarms : []) {  // signals alarm at h, rates at their own h
    drift.series.push({label: `alarm line (${h})`, values: drift.times.map(() => h), stroke: "#d00", dash: [8, 4]});
  }
  draw("chart-drift", "drift statistics (CUSUM) against the alarm line", drift.times, drift.series, s.gates, "CUSUM");
  const outbox = merge(s.devices, (name, d) => [[name, d.outbox_depth]]);
  draw("chart-outbox", "outbox depth (messages waiting for the broker)", outbox.times, outbox.series, s.gates,
       "messages");
}

document.getElementById("minutes").addEventListener("change", load);
load();
