// scaleprotoseg explore: the page. Plain JS, no build step; every number comes from the server's /api.
"use strict";
const S = { model: null, key: null, size: null, pixel: null, classes: new Set(), offP: new Set(), offG: new Set() };
const $ = (id) => document.getElementById(id);
const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(4));

function without() {
  return [...[...S.offP].sort((a, b) => a - b).map((p) => "p" + p), ...[...S.offG].sort((a, b) => a - b).map((g) => "g" + g)].join(",");
}
function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }
async function api(url, options) {
  const r = await fetch(url, options);
  const body = await r.json();
  if (!r.ok) { throw new Error(body.error || r.statusText); }
  return body;
}
async function guarded(fn) {
  try { showError(""); document.body.dataset.busy = "1"; await fn(); }
  catch (err) { showError(err.message); }
  finally { document.body.dataset.busy = ""; }
}
function swatch(c) { const col = S.model.classes[c].color; return `<span class="swatch" style="background:rgb(${col})"></span>`; }
function cname(c) { return S.model.classes[c].name; }

async function loadModel() {
  S.model = await api("/api/model");
  $("model-info").textContent = `${S.model.run || ""} · ${S.model.method} · stage ${S.model.stage} · ` +
    `${S.model.prototypes.length} prototypes, ${S.model.groups.length} groups`;
  $("notes").innerHTML = S.model.notes.map((n) => `<li>${escapeHtml(n)}</li>`).join("");
  const sel = $("image-select");
  for (const im of S.model.images) {
    const o = document.createElement("option");
    o.value = JSON.stringify(im); o.textContent = `${im.source}: ${im.name}`; sel.appendChild(o);
  }
  $("legend").innerHTML = S.model.classes.map((c) => `<span>${swatch(c.index)}${escapeHtml(c.name)}</span>`).join("");
  renderEdits(await api("/api/edits"));
}
function escapeHtml(s) { return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

async function opened(info) {
  S.key = info.key; S.size = info.size; S.pixel = null;
  $("img").src = `/api/image/${S.key}.png`;
  $("map").hidden = true; $("marker").hidden = true; $("map-caption").textContent = "";
  $("cell-info").textContent = `${info.name}: ${info.size[0]} x ${info.size[1]} pixels, grid ${info.grid[0]} x ${info.grid[1]}. Click a pixel.`;
  ["scores", "decomposition", "add-class", "prototype-panel"].forEach((id) => { $(id).innerHTML = ""; });
  await refreshPrediction();
}

async function refreshPrediction() {
  if (!S.key) return;
  const w = without();
  $("ablation").innerHTML = w ? w.split(",").map((t) => `<button class="chip" data-toggle="${t[0]}" data-index="${t.slice(1)}" title="switch on again">${t} ×</button>`).join("") : "nothing";
  $("pred").src = `/api/prediction/${S.key}.png?without=${w}&t=${Date.now()}`;
  $("pred").style.opacity = $("opacity").value / 100;
  if (w) {
    const ch = await api(`/api/changes/${S.key}?without=${w}`);
    $("change-summary").innerHTML = `<span id="changed-pixels" data-changed="${ch.changed_pixels}">${ch.changed_pixels} pixels change class ` +
      `(${(100 * ch.fraction).toFixed(2)}%)</span>` + ch.transitions.map((t) => `<div>${escapeHtml(t.from)} → ${escapeHtml(t.to)}: ${t.pixels}</div>`).join("");
    $("changes-img").src = `/api/changes/${S.key}.png?without=${w}&t=${Date.now()}`;
    $("changes-img").hidden = !$("show-changes").checked;
  } else {
    $("change-summary").innerHTML = ""; $("changes-img").hidden = true;
  }
  if (S.pixel) await showCell();
}

async function showCell() {
  const [y, x] = S.pixel;
  const d = await api(`/api/cell/${S.key}?y=${y}&x=${x}&classes=${[...S.classes].join(",")}&without=${without()}`);
  const img = $("img"), m = $("marker");
  const sy = img.clientHeight / S.size[0], sx = img.clientWidth / S.size[1];
  const ch = S.size[0] / d.grid[0], cw = S.size[1] / d.grid[1];
  Object.assign(m.style, { top: `${d.cell[0] * ch * sy}px`, left: `${d.cell[1] * cw * sx}px`, width: `${cw * sx}px`, height: `${ch * sy}px` });
  m.hidden = false;
  $("cell-info").innerHTML = `Pixel (${y}, ${x}) → cell (${d.cell[0]}, ${d.cell[1]}) of the ${d.grid[0]} x ${d.grid[1]} grid. ` +
    `<span id="cell-pos" data-cell="${d.cell}" data-logits="${d.logits}"></span>Predicted at this cell: <b id="predicted" data-class="${d.predicted}">${swatch(d.predicted)}${escapeHtml(d.predicted_name)}</b>` +
    (d.pixel_class !== d.predicted ? ` (the pixel, after bilinear upsampling: ${escapeHtml(cname(d.pixel_class))})` : "");
  $("scores").innerHTML = "<h2>Class scores at the cell</h2><table><tr><th>class</th><th>logit</th><th></th></tr>" +
    d.logits.map((v, c) => `<tr><td>${swatch(c)}${escapeHtml(cname(c))}</td><td>${fmt(v)}</td><td>` +
      (c === d.predicted ? "predicted" : `<button class="link" data-explain="${c}">${S.classes.has(c) ? "hide" : "explain"}</button>`) + "</td></tr>").join("") + "</table>";
  $("decomposition").innerHTML = d.classes.map((k) => classBlock(k, d)).join("");
}

function classBlock(k, d) {
  const grouped = S.model.grouped;
  let rows = "";
  for (const t of k.terms) {
    if (grouped) {
      const off = S.offG.has(t.group) ? "off" : "";
      rows += `<tr class="term ${off}" data-contribution="${t.contribution}"><td>group ${t.group} ${swatch(t.group_class)}${escapeHtml(cname(t.group_class))}</td>` +
        `<td>${fmt(t.activation)}</td><td>${fmt(t.weight)}</td><td>${fmt(t.contribution)}</td><td>` +
        `<button class="link" data-map="group" data-index="${t.group}">map</button>` +
        `<button class="link" data-toggle="g" data-index="${t.group}">${S.offG.has(t.group) ? "on" : "off"}</button></td></tr>`;
      rows += `<tr class="members"><td colspan="5"><table><tr><th>prototype</th><th>scale</th><th>simplex w</th><th>activation</th><th>w·a (of log a_g)</th><th></th></tr>` +
        t.prototypes.map((p) => `<tr><td>p${p.prototype}</td><td>${p.scale}</td><td>${fmt(p.weight)}</td><td>${fmt(p.activation)}</td><td>${fmt(p.log_contribution)}</td><td>` +
          `<button class="link" data-map="prototype" data-index="${p.prototype}">map</button>` +
          `<button class="link" data-proto="${p.prototype}">patches</button>` +
          `<button class="link" data-toggle="p" data-index="${p.prototype}">off</button></td></tr>`).join("") +
        `<tr class="sum"><td>sum = log a_g</td><td></td><td></td><td></td><td>${fmt(t.log_activation)}</td><td></td></tr></table></td></tr>`;
    } else {
      const off = S.offP.has(t.prototype) ? "off" : "";
      rows += `<tr class="term ${off}" data-contribution="${t.contribution}"><td>p${t.prototype} (scale ${t.scale}) ${swatch(t.prototype_class)}</td>` +
        `<td>${fmt(t.activation)}</td><td>${fmt(t.weight)}</td><td>${fmt(t.contribution)}</td><td>` +
        `<button class="link" data-map="prototype" data-index="${t.prototype}">map</button>` +
        `<button class="link" data-proto="${t.prototype}">patches</button>` +
        `<button class="link" data-toggle="p" data-index="${t.prototype}">${S.offP.has(t.prototype) ? "on" : "off"}</button></td></tr>`;
    }
  }
  const head = grouped ? "<th>group</th><th>activation a_g</th><th>h weight</th><th>contribution</th><th></th>"
    : "<th>prototype</th><th>activation</th><th>h weight</th><th>contribution</th><th></th>";
  return `<div class="class-block" data-class="${k.class}" data-logit="${k.logit}" data-total="${k.total}">` +
    `<h3>${swatch(k.class)}${escapeHtml(k.name)}${k.class === d.predicted ? " (predicted)" : ""}: logit ${fmt(k.logit)}</h3>` +
    `<table><tr>${head}</tr>${rows}<tr class="sum"><td>sum of contributions</td><td></td><td></td><td class="total">${fmt(k.total)}</td><td></td></tr></table></div>`;
}

async function showMap(kind, index) {
  const r = await fetch(`/api/map/${S.key}/${kind}/${index}.png?without=${without()}`);
  if (!r.ok) { throw new Error((await r.json()).error); }
  const range = (r.headers.get("X-Range") || "").split(",");
  const el = $("map");
  el.src = URL.createObjectURL(await r.blob()); el.hidden = false;
  $("map-caption").innerHTML = `Activation map of ${kind} ${index} (from ${range[0]} to ${range[1]}) ` +
    `<button class="link" id="hide-map">hide</button>`;
  $("hide-map").onclick = () => { el.hidden = true; $("map-caption").textContent = ""; };
}

async function showPrototype(p) {
  const info = await api(`/api/prototype/${p}`);
  const src = info.source ? `from ${escapeHtml(info.source.name)} cell (${info.source.cell})` : "no source patch";
  let html = `<h2>Prototype p${p}: ${swatch(info.class)}${escapeHtml(info.class_name)}, scale ${info.scale}</h2>` +
    `<div>in groups: ${info.groups.map((g) => `g${g.group} (w ${fmt(g.weight)})`).join(", ") || "none"}</div>` +
    `<div class="patches"><div>Source patch (projection), ${src}:</div>` +
    (info.has_patch ? `<img src="/api/patch/prototype/${p}.png" alt="source patch">` : "<i>not exported</i>") + "</div>";
  html += `<div class="patches"><div>Nearest training patches:</div>` + (info.nearest.length ? info.nearest.map((e) =>
    `<img src="/api/patch/nearest/${p}/${encodeURIComponent(e.patch)}" title="${escapeHtml(e.name)} activation ${fmt(e.activation)}" alt="nearest ${e.rank}">` +
    (e.overlay ? `<img src="/api/patch/nearest/${p}/${encodeURIComponent(e.overlay)}" alt="activation ${e.rank}">` : "")).join("") : "<i>none exported</i>") + "</div>";
  $("prototype-panel").innerHTML = html;
}

function renderEdits(list) {
  $("edits").innerHTML = list.length ? "<h2>Edits of this run</h2>" + list.map((e) =>
    `<div>${escapeHtml(e.stage)}: removed ${e.removed_prototypes.map((p) => "p" + p).concat(e.removed_groups.map((g) => "g" + g)).join(", ")} ` +
    `by ${escapeHtml(e.author)} (${escapeHtml(e.created)}): ${escapeHtml(e.reason)}</div>`).join("") : "";
}

document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button");
  if (!b) return;
  if (b.dataset.explain !== undefined) {
    const c = Number(b.dataset.explain);
    S.classes.has(c) ? S.classes.delete(c) : S.classes.add(c);
    guarded(showCell);
  } else if (b.dataset.map) {
    guarded(() => showMap(b.dataset.map, Number(b.dataset.index)));
  } else if (b.dataset.proto !== undefined) {
    guarded(() => showPrototype(Number(b.dataset.proto)));
  } else if (b.dataset.toggle) {
    const set = b.dataset.toggle === "p" ? S.offP : S.offG, i = Number(b.dataset.index);
    set.has(i) ? set.delete(i) : set.add(i);
    guarded(refreshPrediction);
  }
});
$("stage").addEventListener("click", (ev) => {
  if (!S.key) return;
  const r = $("img").getBoundingClientRect();
  const y = Math.min(S.size[0] - 1, Math.floor(((ev.clientY - r.top) / r.height) * S.size[0]));
  const x = Math.min(S.size[1] - 1, Math.floor(((ev.clientX - r.left) / r.width) * S.size[1]));
  S.pixel = [Math.max(0, y), Math.max(0, x)];
  guarded(showCell);
});
$("image-select").addEventListener("change", (ev) => {
  if (!ev.target.value) return;
  guarded(async () => opened(await api("/api/open", { method: "POST", headers: { "Content-Type": "application/json" }, body: ev.target.value })));
});
$("upload").addEventListener("change", (ev) => {
  const f = ev.target.files[0];
  if (!f) return;
  guarded(async () => opened(await api(`/api/upload?name=${encodeURIComponent(f.name)}`, { method: "POST", body: f })));
});
$("opacity").addEventListener("input", () => { $("pred").style.opacity = $("opacity").value / 100; });
$("show-changes").addEventListener("change", () => { $("changes-img").hidden = !$("show-changes").checked || !without(); });
$("clear-ablation").addEventListener("click", () => { S.offP.clear(); S.offG.clear(); guarded(refreshPrediction); });
$("save-edit").addEventListener("click", () => guarded(async () => {
  if (!without()) throw new Error("switch off some prototypes or groups first: the edit would remove nothing");
  const rec = await api("/api/edits", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ without: without(), author: $("edit-author").value, reason: $("edit-reason").value, key: S.key }) });
  $("edit-result").innerHTML = `<span id="edit-saved">saved as ${escapeHtml(rec.stage)}</span>; measure it with ` +
    `<code>scaleprotoseg evaluate RUN --stage ${escapeHtml(rec.stage)}</code>`;
  renderEdits(await api("/api/edits"));
}));
guarded(loadModel);
