# ruff: noqa: E501  (markup and script lines are kept whole)
"""The page around the data: the Jinja template, its style sheet and the glue script.

Kept as Python strings (not package data files) so an installed headlab always has them. The
script only glues plotly to the page: it reads the embedded JSON, draws the chosen heatmap,
opens a head's card on a click or a search, and sorts and filters the ranking table. Every text
from the runs reaches the page through Jinja's autoescape, the escaped JSON block, or the DOM's
``textContent`` (never ``innerHTML``); text handed to plotly (which reads a few HTML tags) is
escaped first.

The Content-Security-Policy forbids every network request: the file works offline, and a
browser refuses anything that would reach out.
"""

from __future__ import annotations

__all__ = ["CSS", "SCRIPT", "TEMPLATE"]

CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --accent: #2456a6; --bg: #fafbfc; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--fg); background: var(--bg); }
header { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid
         var(--line); padding: 8px 20px; display: flex; gap: 16px; align-items: center;
         flex-wrap: wrap; }
header h1 { font-size: 17px; margin: 0; }
header .sub { color: var(--muted); font-size: 12px; }
header nav a { margin-right: 12px; color: var(--accent); text-decoration: none; }
#search { width: 150px; padding: 4px 8px; border: 1px solid var(--line); border-radius: 4px; }
#search-msg { color: #b3261e; font-size: 12px; }
main { padding: 10px 20px 60px; max-width: 1500px; }
section { margin-top: 18px; }
h2 { font-size: 16px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 14px; margin: 14px 0 4px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: left;
         vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font-size: 12px; background: #eef1f5; padding: 1px 4px; border-radius: 3px;
       word-break: break-all; }
.unfinished { color: #b3261e; font-weight: 600; }
.note { color: var(--muted); font-size: 12px; }
.runtag { color: var(--muted); font-size: 12px; }
#ranking-wrap { max-height: 520px; overflow: auto; border: 1px solid var(--line); }
#ranking th { position: sticky; top: 0; background: #f0f2f6; cursor: pointer; user-select: none; }
#ranking tbody tr { cursor: pointer; }
#ranking tbody tr:hover { background: #eef3fb; }
#card { position: fixed; top: 0; right: 0; width: min(560px, 100vw); height: 100vh;
        overflow-y: auto; background: #fff; border-left: 1px solid var(--line); z-index: 10;
        padding: 12px 16px 40px; box-shadow: -4px 0 12px rgba(0,0,0,.08); display: none; }
#card.open { display: block; }
#card h2 { margin-top: 0; display: flex; justify-content: space-between; }
#card-close { cursor: pointer; border: 0; background: none; font-size: 20px; }
.tokens { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
.tok { font-family: ui-monospace, monospace; white-space: pre; }
.controls { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; }
select, input[type=text] { font: inherit; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("atlas-data").textContent);
  const NL = DATA.model.n_layers, NH = DATA.model.n_heads;
  const CONFIG = {responsive: true, displaylogo: false};
  const $ = (id) => document.getElementById(id);
  const name = (l, h) => "L" + l + ".H" + h;
  const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  const fmt = (x, d) => (x === null || x === undefined || Number.isNaN(x)) ? "–"
      : Number(x).toPrecision(d || 6).replace(/\.?0+(e|$)/, "$1");
  const signed = (x, d) => (x === null || x === undefined) ? "–" : (x >= 0 ? "+" : "") + fmt(x, d);

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function withTemplate(layout) {
    return Object.assign({template: DATA.template, margin: {l: 50, r: 20, t: 30, b: 50}},
                         layout || {});
  }
  function cell(map, l, h) {  // the numbers of head (l, h) in one map (null: not measured)
    const tr = map.figure.data[0];
    const v = tr.z[l] ? tr.z[l][h] : null;
    if (v === null || v === undefined) return null;
    const c = tr.customdata[l][h];  // [lo, hi, n, rank, text]
    return {value: v, lo: c[0], hi: c[1], n: c[2], rank: c[3], text: c[4]};
  }

  // -- heatmaps ---------------------------------------------------------------------------
  let current = 0;
  function renderMap(i) {
    current = i;
    const map = DATA.maps[i];
    const layout = withTemplate(map.figure.layout);
    // the table follows once the heatmap is on screen
    return Plotly.react($("heatmap"), map.figure.data, layout, CONFIG).then(() => {
      setTimeout(renderRanking, 0);
    });
  }
  function bindMaps() {
    const sel = $("map-select");
    DATA.maps.forEach((m, i) => {
      const o = el("option", m.run + " · " + m.group + " · " + m.name + " (" + m.quantity + ")");
      o.value = i;
      sel.appendChild(o);
    });
    sel.addEventListener("change", () => renderMap(Number(sel.value)));
  }

  // -- ranking table ----------------------------------------------------------------------
  let sortKey = "rank", sortUp = true;
  function rankingRows() {
    const map = DATA.maps[current], rows = [];
    for (let l = 0; l < NL; l++) for (let h = 0; h < NH; h++) {
      const c = cell(map, l, h);
      if (c) rows.push(Object.assign({layer: l, head: h, name: name(l, h),
                                      tags: (NOTES[name(l, h)] || []).map((n) => n[3])
                                        .filter(Boolean).join("; ")}, c));
    }
    return rows;
  }
  function renderRanking() {
    const map = DATA.maps[current];
    $("ranking-title").textContent = map.run + " · " + map.group + " · " + map.name;
    const q = $("filter").value.trim().toLowerCase();
    let rows = rankingRows().filter((r) => !q || (r.name + " " + r.tags + " " + (r.text || ""))
                                              .toLowerCase().includes(q));
    const key = (r) => (sortKey === "name") ? r.layer * 100000 + r.head : r[sortKey];
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      const d = (typeof x === "string") ? String(x).localeCompare(String(y))
                                        : ((x === null) - (y === null)) || (x - y);
      return sortUp ? d : -d;
    });
    const body = $("ranking").tBodies[0];
    body.replaceChildren();
    for (const r of rows) {
      const tr = el("tr");
      tr.dataset.head = r.name;
      tr.appendChild(el("td", r.name));
      const v0 = map.diverging ? signed(r.value, 5) : fmt(r.value, 5);
      for (const v of [v0, signed(r.lo, 4), signed(r.hi, 4), fmt(r.n, 4), fmt(r.rank, 6)])
        tr.appendChild(el("td", v, "num"));
      tr.appendChild(el("td", [r.text, r.tags].filter(Boolean).join("; ")));
      tr.addEventListener("click", () => openCard(r.layer, r.head));
      body.appendChild(tr);
    }
    $("ranking-count").textContent = rows.length + " heads";
  }
  function bindRanking() {
    $("filter").addEventListener("input", renderRanking);
    for (const th of $("ranking").tHead.rows[0].cells) {
      th.addEventListener("click", () => {
        const k = th.dataset.key;
        sortUp = (sortKey === k) ? !sortUp : (k === "rank" || k === "name");
        sortKey = k;
        renderRanking();
      });
    }
  }

  // -- head cards -------------------------------------------------------------------------
  const NOTES = {};
  for (const n of DATA.notes) (NOTES[n[0]] = NOTES[n[0]] || []).push(n);
  let PATTERNS = null;
  function patterns() {
    if (PATTERNS === null && DATA.views && DATA.views.patterns) {
      const raw = atob(DATA.views.patterns);
      PATTERNS = new Uint8Array(raw.length);
      for (let i = 0; i < raw.length; i++) PATTERNS[i] = raw.charCodeAt(i);
    }
    return PATTERNS;
  }
  function openCard(l, h) {
    const card = $("card"), body = $("card-body");
    $("card-title").textContent = name(l, h);
    card.dataset.head = name(l, h);
    body.replaceChildren();
    const byRun = {};
    DATA.maps.forEach((m) => {
      const c = cell(m, l, h);
      if (c) (byRun[m.run + " · " + m.group] = byRun[m.run + " · " + m.group] || []).push([m, c]);
    });
    const t = el("table");
    t.id = "card-numbers";
    const head = el("tr");
    for (const x of ["measure", "value", "95 % CI", "n", "rank"]) head.appendChild(el("th", x));
    t.appendChild(head);
    for (const [group, items] of Object.entries(byRun)) {
      const g = el("tr");
      const td = el("td", group, "runtag");
      td.colSpan = 5;
      g.appendChild(td);
      t.appendChild(g);
      for (const [m, c] of items) {
        const tr = el("tr");
        tr.dataset.map = m.id;
        tr.appendChild(el("td", m.name + " (" + m.quantity + ")" + (c.text ? " · " + c.text : "")));
        tr.appendChild(el("td", m.diverging ? signed(c.value, 6) : fmt(c.value, 6), "num value"));
        tr.appendChild(el("td", (c.lo === null) ? "–" : signed(c.lo, 4) + " … " + signed(c.hi, 4),
                          "num"));
        tr.appendChild(el("td", fmt(c.n, 6), "num"));
        tr.appendChild(el("td", fmt(c.rank, 6) + " of " + m.of, "num"));
        t.appendChild(tr);
      }
    }
    body.appendChild(t);
    const notes = NOTES[name(l, h)] || [];
    if (notes.length) {
      body.appendChild(el("h3", "what else the runs say"));
      const ul = el("ul");
      for (const n of notes) ul.appendChild(el("li", n[1] + " · " + n[2]));
      body.appendChild(ul);
    }
    const v = DATA.views;
    if (v && v.patterns) {
      body.appendChild(el("h3", "attention pattern"));
      body.appendChild(el("div", v.pattern_source, "note"));
      const div = el("div");
      div.id = "card-pattern";
      body.appendChild(div);
      const [, , T] = v.pattern_shape, p = patterns(), off = (l * NH + h) * T * T, z = [];
      for (let q = 0; q < T; q++) {
        const row = [];
        for (let k = 0; k < T; k++) row.push(p[off + q * T + k] / 255);
        z.push(row);
      }
      const ticks = v.tokens.map((s, i) => i + " " + esc(s));
      const idx = v.tokens.map((_, i) => i);
      Plotly.newPlot(div, [{type: "heatmap", z: z, zmin: 0, zmax: 1,
        colorscale: [[0, "#ffffff"], [0.2, "#9ecae1"], [1, "#08306b"]],
        hovertemplate: "query %{y} → key %{x}: %{z:.3f}<extra></extra>", showscale: false}],
        withTemplate({height: 460, xaxis: {tickvals: idx, ticktext: ticks, tickfont: {size: 8},
          title: {text: "key"}}, yaxis: {tickvals: idx, ticktext: ticks, autorange: "reversed",
          tickfont: {size: 8}, title: {text: "query"}}, margin: {l: 90, r: 10, t: 10, b: 90}}),
        CONFIG);
    }
    if (v && v.promoted) {
      body.appendChild(el("h3", "tokens its mean output promotes and suppresses"));
      body.appendChild(el("div", v.mean_source + "; logits through W_O and the unembedding, " +
                                 "centred", "note"));
      const grid = el("div", null, "tokens");
      for (const [title, lists] of [["promotes", v.promoted], ["suppresses", v.suppressed]]) {
        const box = el("div");
        box.appendChild(el("strong", title));
        const tb = el("table");
        for (const [tok, val] of lists[l][h]) {
          const tr = el("tr");
          tr.appendChild(el("td", tok, "tok"));
          tr.appendChild(el("td", signed(val, 4), "num"));
          tb.appendChild(tr);
        }
        box.appendChild(tb);
        grid.appendChild(box);
      }
      body.appendChild(grid);
    }
    for (const n of DATA.model_notes) body.appendChild(el("p", n, "note"));
    card.classList.add("open");
    $("search-msg").textContent = "";
  }
  window.atlasOpenCard = openCard;

  function headOfPoint(ev) {
    const p = ev && ev.points && ev.points[0];
    if (!p) return null;
    if (p.data.meta === "heads" && Array.isArray(p.customdata)) return p.customdata;
    if (p.data.type === "heatmap") return [p.y, p.x];
    return null;
  }

  // -- search -----------------------------------------------------------------------------
  function search() {
    const m = $("search").value.trim().match(/^L?\s*(\d+)\s*[.:_\/ ,-]?\s*H?\s*(\d+)$/i);
    if (!m) { $("search-msg").textContent = "type a head as L16.H0 (or 16.0)"; return; }
    const l = Number(m[1]), h = Number(m[2]);
    if (l >= NL || h >= NH) {
      $("search-msg").textContent = "no head " + name(l, h) + " (layers 0–" + (NL - 1) +
                                    ", heads 0–" + (NH - 1) + ")";
      return;
    }
    openCard(l, h);
  }

  // -- panels, drawn when scrolled into view ------------------------------------------------
  function bindPanels() {
    const draw = (div) => {
      if (div.dataset.drawn) return;
      div.dataset.drawn = "1";
      const p = DATA.panels[Number(div.dataset.panel)];
      Plotly.newPlot(div, p.figure.data, withTemplate(p.figure.layout), CONFIG).then(() => {
        div.on("plotly_click", (ev) => { const hd = headOfPoint(ev); if (hd) openCard(hd[0], hd[1]); });
      });
    };
    const divs = document.querySelectorAll(".panel-plot");
    if ("IntersectionObserver" in window) {
      const io = new IntersectionObserver((entries) => {
        for (const e of entries) if (e.isIntersecting) { draw(e.target); io.unobserve(e.target); }
      }, {rootMargin: "300px"});
      divs.forEach((d) => io.observe(d));
    } else divs.forEach(draw);
  }

  document.addEventListener("DOMContentLoaded", () => {
    bindMaps();
    bindRanking();
    bindPanels();
    $("search").addEventListener("keydown", (e) => { if (e.key === "Enter") search(); });
    $("search-go").addEventListener("click", search);
    $("card-close").addEventListener("click", () => $("card").classList.remove("open"));
    if (!DATA.maps.length) {
      window.atlasReady = performance.now();
      return;
    }
    renderMap(0).then(() => {
      $("heatmap").on("plotly_click", (ev) => { const hd = headOfPoint(ev); if (hd) openCard(hd[0], hd[1]); });
      window.atlasReady = performance.now();
      document.body.dataset.ready = "1";
    });
  });
})();
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="headlab {{ version }}">
<title>{{ title }}</title>
<style>{{ css | safe }}</style>
</head>
<body>
<header>
  <div>
    <h1>{{ title }}</h1>
    <div class="sub">{{ model.n_layers }} layers × {{ model.n_heads }} heads · weights fingerprint
      <code>{{ model.fingerprint }}</code> · {{ runs | length }} run{{ '' if runs | length == 1 else 's' }}</div>
  </div>
  <nav><a href="#overview">overview</a><a href="#maps">heatmaps</a><a href="#ranking-section">ranking</a>{% if panels %}<a href="#panels">analyses</a>{% endif %}</nav>
  <div><input id="search" type="text" placeholder="L16.H0" aria-label="find a head">
    <button id="search-go" type="button">find</button> <span id="search-msg"></span></div>
</header>
<main>
<section id="overview">
  <h2>Overview</h2>
  <table id="runs">
    <tr><th>run</th><th>command</th><th>status</th><th>model and data</th><th>sizes</th><th>clean metrics</th></tr>
    {% for r in runs %}
    <tr>
      <td><strong>{{ r.label }}</strong><br><span class="note">{{ r.path }}</span>
        <details><summary class="note">reproduce</summary><code>{{ r.command }}</code></details>
        {% for n in r.notes %}<div class="note">note: {{ n }}</div>{% endfor %}</td>
      <td>{{ r.kind }}</td>
      <td>{% if r.complete %}complete{% else %}<span class="unfinished">unfinished ({{ r.status }})</span><br><span class="note">shows what was finished</span>{% endif %}<br><span class="note">{{ r.created }}</span></td>
      <td>{{ r.model }}<br><span class="note">{{ r.data }}</span></td>
      <td>{% for s in r.sizes %}{{ s }}<br>{% endfor %}</td>
      <td>{% for k, v in r.clean.items() %}{{ k }} = {{ v }}<br>{% endfor %}</td>
    </tr>
    {% endfor %}
  </table>
  {% for n in notes %}<p class="note">{{ n }}</p>{% endfor %}
</section>
<section id="maps">
  <h2>Layer × head heatmaps</h2>
  {% if maps %}
  <div class="controls"><label>show <select id="map-select"></select></label>
    <span class="note">hover a cell for its numbers; click it for the head's card</span></div>
  <div id="heatmap"></div>
  {% else %}<p class="note">these runs hold no per-head numbers</p><select id="map-select" hidden></select><div id="heatmap"></div>{% endif %}
</section>
<section id="ranking-section">
  <h2>Ranking: <span id="ranking-title"></span></h2>
  <div class="controls"><input id="filter" type="text" placeholder="filter: L3. or facilitating" aria-label="filter the ranking">
    <span id="ranking-count" class="note"></span><span class="note">click a column to sort, a row for the card</span></div>
  <div id="ranking-wrap"><table id="ranking">
    <thead><tr><th data-key="name">head</th><th data-key="value">value</th><th data-key="lo">95 % low</th><th data-key="hi">95 % high</th><th data-key="n">n</th><th data-key="rank">rank</th><th data-key="tags">notes</th></tr></thead>
    <tbody></tbody></table></div>
</section>
{% if panels %}
<section id="panels">
  <h2>Analyses</h2>
  {% for p in panels %}
  <h3>{{ p.title }} <span class="runtag">· {{ p.run }}</span></h3>
  <div class="panel-plot" data-panel="{{ loop.index0 }}" style="min-height: 360px"></div>
  {% endfor %}
</section>
{% endif %}
</main>
<aside id="card" aria-live="polite"><h2><span id="card-title"></span><button id="card-close" type="button" aria-label="close">×</button></h2><div id="card-body"></div></aside>
<script type="application/json" id="atlas-data">{{ data_json | safe }}</script>
<script>{{ plotly_js | safe }}</script>
<script>{{ script | safe }}</script>
</body>
</html>
"""
