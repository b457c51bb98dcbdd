// strop ui: the little JavaScript the pages need, written by hand (no build step, no network).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, text = "") => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
};

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({error: `error: ${r.status} ${r.statusText}`}));
  if (!r.ok) throw new Error(data.error || `error: ${r.status}`);
  return data;
}

const num = (x, digits = 4) => (typeof x === "number" && isFinite(x) ? x.toPrecision(digits) : "—");

function duration(s) {
  if (typeof s !== "number") return "—";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

// ---- runs table: sorted and filtered here, refreshed from /api/runs ---------------------------------

function runsPage() {
  const table = $("#runs"), body = $("tbody", table), filter = $("#filter");
  let rows = JSON.parse($("#rows").textContent), sortKey = "started", sortDesc = true;
  const cells = r => [
    [r.id, `/run/${r.id}`], [r.task], [r.model], [r.method], [r.status, null, `status ${r.status}`],
    [num(r.best_val_loss)], [r.metric ? `${r.metric} ${num(r.metric_value, 3)}` : "—"],
    [duration(r.seconds)], [new Date(r.started * 1000).toLocaleString()],
  ];
  function draw() {
    const q = filter.value.trim().toLowerCase();
    const shown = rows.filter(r => !q || [r.id, r.task, r.model, r.method, r.status, r.metric || ""]
      .some(v => String(v).toLowerCase().includes(q)));
    const type = $(`th[data-key="${sortKey}"]`, table).dataset.type;
    shown.sort((a, b) => {
      let x = a[sortKey], y = b[sortKey];
      if (type === "number") { x = x ?? -Infinity; y = y ?? -Infinity; return sortDesc ? y - x : x - y; }
      return sortDesc ? String(y).localeCompare(String(x)) : String(x).localeCompare(String(y));
    });
    body.replaceChildren(...shown.map(r => {
      const tr = el("tr", {"data-run": r.id});
      for (const [text, href, cls] of cells(r)) {
        const td = el("td");
        const inner = href ? el("a", {href}, text) : el("span", cls ? {class: cls} : {}, text);
        td.append(inner);
        tr.append(td);
      }
      return tr;
    }));
    $("#count").textContent = `${shown.length} of ${rows.length} runs`;
    $("#empty").hidden = rows.length > 0;
    for (const th of table.tHead.rows[0].cells)
      th.className = th.dataset.key === sortKey ? (sortDesc ? "desc" : "asc") : "";
  }
  for (const th of table.tHead.rows[0].cells) th.addEventListener("click", () => {
    if (sortKey === th.dataset.key) sortDesc = !sortDesc; else { sortKey = th.dataset.key; sortDesc = false; }
    draw();
  });
  filter.addEventListener("input", draw);
  draw();
  setInterval(async () => { try { rows = await api("/api/runs"); draw(); } catch (e) { /* next poll */ } }, 3000);
}

// ---- curves: inline SVG drawn from the tail of metrics.jsonl ----------------------------------------

const NOT_CURVES = new Set(["step", "total_steps", "elapsed_s", "label_tokens"]);

function chartName(key) { return key.startsWith("val_") ? key.slice(4) : key; }

function drawChart(svg, series) {
  const W = 560, H = 220, L = 56, R = 12, T = 12, B = 28;
  const pts = Object.values(series).flat();
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (!pts.length) return;
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => T + (y1 - y) / (y1 - y0) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg", add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  add("rect", {x: L, y: T, width: W - L - R, height: H - T - B, class: "frame"});
  for (const y of [y0, (y0 + y1) / 2, y1]) add("text", {x: L - 4, y: sy(y) + 4, class: "tick", "text-anchor": "end"}, num(y, 3));
  for (const x of [x0, x1]) add("text", {x: sx(x), y: H - 8, class: "tick", "text-anchor": "middle"}, String(Math.round(x)));
  let i = 0;
  for (const [name, points] of Object.entries(series)) {
    const cls = `line s${i++}`;
    add("polyline", {points: points.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "), class: cls, "data-series": name});
    if (points.length === 1) add("circle", {cx: sx(points[0][0]), cy: sy(points[0][1]), r: 3, class: cls});
    add("text", {x: W - R - 4, y: T + 14 * i, class: `legend ${cls}`, "text-anchor": "end"}, name);
  }
}

function curves(rid) {
  const box = $("#charts"), data = {};
  let offset = 0;
  async function poll() {
    let got;
    try { got = await api(`/api/metrics/${rid}?offset=${offset}`); } catch (e) { return; }
    if (got.reset) for (const k of Object.keys(data)) delete data[k];
    offset = got.offset;
    for (const r of got.records) {
      for (const [k, v] of Object.entries(r)) {
        if (NOT_CURVES.has(k) || typeof v !== "number" || !isFinite(v) || typeof r.step !== "number") continue;
        ((data[chartName(k)] ??= {})[k] ??= []).push([r.step, v]);
      }
    }
    if (!got.records.length && !got.reset) return;
    for (const [chart, series] of Object.entries(data)) {
      let fig = $(`#chart-${CSS.escape(chart)}`);
      if (!fig) {
        fig = el("figure", {id: `chart-${chart}`, class: "chart"});
        fig.append(el("figcaption", {}, chart), document.createElementNS("http://www.w3.org/2000/svg", "svg"));
        box.append(fig);
      }
      drawChart($("svg", fig), series);
    }
  }
  poll();
  setInterval(poll, 1500);
}

// ---- a run page: status, stop and resume -----------------------------------------------------------

function runPage() {
  const rid = $("#run").dataset.rid;
  curves(rid);
  const stop = $("#stop"), resume = $("#resume"), status = $("#status"), err = $("#job-error");
  let last = status.textContent;
  async function poll() {
    let r;
    try { r = await api(`/api/run/${rid}`); } catch (e) { return; }
    status.textContent = r.status;
    status.className = `status ${r.status}`;
    stop.hidden = r.status !== "running" || r.log === null;
    resume.hidden = r.status !== "stopped";
    err.hidden = !r.error;
    err.textContent = r.error || "";
    if (r.log !== null && $("#log")) $("#log").textContent = r.log;
    if (last === "running" && r.status !== "running") location.reload();  // report, samples, checkpoints
    last = r.status;
  }
  stop.addEventListener("click", async () => {
    stop.disabled = true;
    try { await api(`/api/stop/${rid}`, {}); } catch (e) { err.hidden = false; err.textContent = e.message; }
  });
  resume.addEventListener("click", async () => {
    try { await api(`/api/resume/${rid}`, {}); location.reload(); }
    catch (e) { err.hidden = false; err.textContent = e.message; }
  });
  const filter = $("#sample-filter");
  if (filter) filter.addEventListener("input", () => {
    const q = filter.value.toLowerCase();
    for (const tr of $("#samples tbody").rows) tr.hidden = q && !tr.textContent.toLowerCase().includes(q);
  });
  setInterval(poll, 2000);
}

// ---- the start form: changed fields become --set overrides; checked, then started -------------------

function startPage() {
  const form = $("#config-form");
  if (!form) return;
  const errBox = $("#form-error"), launch = $("#launch");
  const values = () => {
    const out = {};
    for (const f of form.querySelectorAll("input[name], select[name]"))
      if (f.value !== f.dataset.initial) out[f.name] = f.value;
    return out;
  };
  const body = () => ({base: form.dataset.base, values: values()});
  function clearInvalid() {
    for (const f of form.querySelectorAll(".field.invalid")) f.classList.remove("invalid");
    for (const e of form.querySelectorAll(".field-error")) e.remove();
  }
  function showError(message) {
    errBox.hidden = false;
    errBox.textContent = message;
    clearInvalid();
    for (const m of message.matchAll(/^\s*([\w.]+): (.*)$/gm)) {  // the keys the error names
      const field = form.querySelector(`.field[data-key="${CSS.escape(m[1])}"]`);
      if (!field) continue;
      field.classList.add("invalid");
      field.append(el("span", {class: "field-error"}, m[2]));
      field.closest("details").open = true;
    }
  }
  form.addEventListener("input", () => { launch.disabled = true; });
  $("#check").addEventListener("click", async () => {
    errBox.hidden = true;
    $("#findings").hidden = true;
    $("#check").disabled = true;
    try {
      const r = await api("/api/check", body());
      $("#command").textContent = r.command;
      $("#check-text").textContent = r.findings.text;
      $("#findings").hidden = false;
      launch.disabled = r.findings.errors.length > 0;
      clearInvalid();
    } catch (e) { showError(e.message); } finally { $("#check").disabled = false; }
  });
  launch.addEventListener("click", async () => {
    launch.disabled = true;
    try { const r = await api("/api/start", body()); location.href = `/run/${r.run}`; }
    catch (e) { showError(e.message); }
  });
}

// ---- try: chat streamed from the run's /v1/chat/completions; predict; score -------------------------

function tryPage() {
  const box = $("#try"), rid = box.dataset.rid, err = $("#try-error");
  const fail = e => { err.hidden = false; err.textContent = e.message || String(e); };
  if (box.dataset.how === "chat") {
    const history = [], convo = $("#conversation");
    const bubble = (role, text) => { const d = el("div", {class: `turn ${role}`}, text); convo.append(d); return d; };
    $("#reset").addEventListener("click", () => { history.length = 0; convo.replaceChildren(); });
    $("#chat-form").addEventListener("submit", async ev => {
      ev.preventDefault();
      const text = $("#message").value.trim();
      if (!text) return;
      err.hidden = true;
      $("#message").value = "";
      history.push({role: "user", content: text});
      bubble("user", text);
      const out = bubble("assistant", "");
      out.classList.add("streaming");
      const system = $("#system").value.trim();
      const messages = system ? [{role: "system", content: system}, ...history] : history;
      $("#send").disabled = true;
      try {
        const r = await fetch(`/serve/${rid}/v1/chat/completions`, {
          method: "POST", headers: {"Content-Type": "application/json"},
          body: JSON.stringify({model: box.dataset.served, messages, stream: true,
            max_tokens: Number($("#max-tokens").value), temperature: Number($("#temperature").value)}),
        });
        if (!r.ok) throw new Error(((await r.json().catch(() => ({}))).error || {}).message || `error: ${r.status}`);
        const reader = r.body.getReader(), dec = new TextDecoder();
        let buf = "", reply = "";
        for (;;) {
          const {value, done} = await reader.read();
          if (done) break;
          buf += dec.decode(value, {stream: true});
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const line = buf.slice(0, cut).replace(/^data: /, "");
            buf = buf.slice(cut + 2);
            if (line === "[DONE]") continue;
            const ev = JSON.parse(line);
            if (ev.error) throw new Error(ev.error.message);
            for (const c of ev.choices) if (c.delta && c.delta.content) { reply += c.delta.content; out.textContent = reply; }
          }
        }
        history.push({role: "assistant", content: reply});
      } catch (e) { fail(e); history.pop(); } finally { out.classList.remove("streaming"); $("#send").disabled = false; }
    });
  } else if (box.dataset.how === "predict") {
    $("#predict-form").addEventListener("submit", async ev => {
      ev.preventDefault();
      err.hidden = true;
      try {
        const r = await api(`/api/predict/${rid}`, {text: $("#text").value, pair: $("#pair").value || null});
        const rows = Object.entries(r.probabilities).sort((a, b) => b[1] - a[1]);
        $("#prediction tbody").replaceChildren(...rows.map(([k, p]) => {
          const tr = el("tr", k === r.label ? {class: "best"} : {});
          tr.append(el("td", {}, k), el("td", {}, p.toFixed(4)));
          return tr;
        }));
        $("#prediction").hidden = false;
      } catch (e) { fail(e); }
    });
  } else {
    $("#score-form").addEventListener("submit", async ev => {
      ev.preventDefault();
      err.hidden = true;
      try {
        const r = await api(`/api/score/${rid}`, {prompt: $("#prompt").value, response: $("#response").value});
        $("#reward").hidden = false;
        $("#reward").textContent = `reward ${r.reward.toFixed(4)}`;
      } catch (e) { fail(e); }
    });
  }
}

const PAGES = {runs: runsPage, run: runPage, start: startPage, try: tryPage};
(PAGES[document.body.dataset.page] || (() => {}))();
