/* attnprobe explore.html: the heads table, the layer x head grid, each head's patterns and flags.
   Every metric is read from the embedded JSON (the Parquet values); nothing here computes one. Patterns are
   8-bit display copies (byte = round(sqrt(weight) * 255)). No network, no storage, no event attributes. */
(function () {
  "use strict";

  var DATA = JSON.parse(document.getElementById("explore-data").textContent);
  var PAT = DATA.runs.map(function (_, i) {
    var el = document.getElementById("explore-patterns-" + i);
    return el ? JSON.parse(el.textContent) : { examples: [] };
  });
  var FLAG_NAMES = ["entropy_collapse", "low_gtd", "high_gtd", "sink", "diffuse", "collapsed", "flagged"];
  var LABELS = { direct_entropy: "direct entropy", direct_entropy_norm: "direct entropy (norm)",
    indirect_entropy: "indirect entropy", indirect_entropy_norm: "indirect entropy (norm)", gtd: "GTD",
    self_mass: "self mass", local_mass: "local mass", first_mass: "first mass", special_mass: "special mass",
    sink_mass: "sink mass", bp_shift: "bp_shift" };
  var state = { set: 0, other: -1, metric: DATA.metrics.indexOf("gtd") >= 0 ? "gtd" : DATA.metrics[0],
    layer: -1, head: -1, hideSink: false, plain: false, sort: { key: "layer", dir: 1 }, filters: {},
    hover: null };
  var app = document.getElementById("app");
  var decoded = {};

  /* --- small helpers --------------------------------------------------------------------------- */
  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { e.textContent = attrs[k]; } else if (k === "cls") { e.className = attrs[k]; }
      else { e.setAttribute(k, attrs[k]); }
    });
    (kids || []).forEach(function (c) { if (c) { e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); } });
    return e;
  }
  function fmt(v, d) {
    if (v === null || v === undefined) { return "\u2013"; }
    if (typeof v === "boolean") { return v ? "yes" : "no"; }
    if (typeof v !== "number") { return String(v); }
    if (Number.isInteger(v)) { return String(v); }
    return v.toFixed(d === undefined ? 4 : d);
  }
  function label(m) { return LABELS[m] || m; }
  function set() { return DATA.sets[state.set]; }
  function run(s) { return DATA.runs[(s || set()).run]; }
  function shape(s) { return run(s).shape; }
  function rowOf(s, layer, head) { return layer * shape(s)[1] + head; }
  function rows(s) { return s.heads.layer.length; }
  function value(s, col, i) { var c = s.heads[col]; return c ? c[i] : null; }
  function mix(stops, t) {
    t = Math.max(0, Math.min(1, isFinite(t) ? t : 0));
    var x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
    return stops[i].map(function (a, k) { return Math.round(a + (stops[i + 1][k] - a) * f); });
  }
  var BLUES = [[255, 255, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
  var VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  var DIVERGE = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];
  var LUT = [];
  for (var b = 0; b < 256; b++) { LUT.push(mix(BLUES, b / 255)); }
  function rgb(c) { return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")"; }
  function bytes(runIndex, ex, kind, idx) {
    var key = runIndex + "/" + ex + "/" + kind + "/" + idx;
    if (!(key in decoded)) {
      var s = PAT[runIndex].examples[ex][kind][idx];
      if (s === null || s === undefined) { decoded[key] = null; } else {
        var bin = atob(s), out = new Uint8Array(bin.length);
        for (var i = 0; i < bin.length; i++) { out[i] = bin.charCodeAt(i); }
        decoded[key] = out;
      }
    }
    return decoded[key];
  }
  function download(name, blob) {
    var url = typeof blob === "string" ? blob : URL.createObjectURL(blob);
    var a = el("a", { href: url, download: name });
    document.body.appendChild(a);
    a.click();
    a.remove();
    document.body.setAttribute("data-last-export", name);
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
  }

  /* --- the frame ------------------------------------------------------------------------------- */
  var notes = el("div");
  (DATA.notes || []).forEach(function (n) { notes.appendChild(el("p", { cls: "notice", text: n })); });
  if (DATA.notice) { notes.appendChild(el("p", { cls: "notice", id: "budget-notice", text: DATA.notice })); }
  var setSel = el("select", { id: "set" }), otherSel = el("select", { id: "compare" });
  var metricSel = el("select", { id: "metric" });
  DATA.sets.forEach(function (s, i) { setSel.appendChild(el("option", { value: String(i), text: s.label })); });
  DATA.metrics.forEach(function (m) { metricSel.appendChild(el("option", { value: m, text: label(m) })); });
  metricSel.value = state.metric;
  var sinkBox = el("input", { type: "checkbox", id: "hide-sink" });
  var plainBox = el("input", { type: "checkbox", id: "plain" });
  var csvBtn = el("button", { id: "export-csv", type: "button", text: "Export table as CSV" });
  var controls = el("div", { cls: "controls" }, [
    el("label", {}, ["Heads of ", setSel]), el("label", {}, ["compare with ", otherSel]),
    el("label", {}, ["grid colour ", metricSel]),
    el("label", { title: "Hide position 0 and renormalize each row over the other keys" }, [sinkBox, " hide first position (sink)"]),
    el("label", { id: "plain-label" }, [plainBox, " plain attention beside (before SAOBP)"]), csvBtn,
    el("span", { cls: "muted", text: "keys: n / p next / previous flagged head, arrows move in the grid" })]);
  var gridCanvas = el("canvas", { cls: "grid", id: "grid" });
  var gridStatus = el("div", { cls: "status", id: "grid-status" });
  var panel = el("div", { cls: "panel", id: "head" });
  var tableBox = el("div", { cls: "wide", id: "heads-box" });
  var changeBox = el("div", { cls: "wide", id: "changes-box" });
  var layerBox = el("div", { cls: "wide", id: "layers-box" });
  app.appendChild(notes);
  app.appendChild(controls);
  app.appendChild(el("div", { cls: "top" }, [el("div", { cls: "grid-box" }, [el("h2", { id: "grid-title" }), gridCanvas, gridStatus]), panel]));
  app.appendChild(el("h2", { text: "Heads" }));
  app.appendChild(el("p", { cls: "sub", text: "Click a column name to sort; type > 0.5, < 0.1, 0.2..0.4 or a value under it to filter; click a row to open the head." }));
  app.appendChild(tableBox);
  app.appendChild(changeBox);
  app.appendChild(el("h2", { text: "Layers (layer means)" }));
  app.appendChild(layerBox);

  function fillOther() {
    otherSel.textContent = "";
    otherSel.appendChild(el("option", { value: "-1", text: "nothing" }));
    var sh = shape();
    DATA.sets.forEach(function (s, i) {
      if (i !== state.set && shape(s)[0] === sh[0] && shape(s)[1] === sh[1]) {
        otherSel.appendChild(el("option", { value: String(i), text: s.label }));
      }
    });
    if (!otherSel.querySelector('option[value="' + state.other + '"]')) { state.other = -1; }
    otherSel.value = String(state.other);
  }

  /* --- the grid -------------------------------------------------------------------------------- */
  var G = { cell: 30, left: 34, top: 22 };
  function gridValues() {
    var s = set(), o = state.other >= 0 ? DATA.sets[state.other] : null, out = [];
    for (var i = 0; i < rows(s); i++) {
      var v = value(s, state.metric, i);
      if (o) { var w = value(o, state.metric, i); v = (v === null || w === null) ? null : v - w; }
      out.push(v);
    }
    return out;
  }
  function drawGrid() {
    var s = set(), sh = shape(), vals = gridValues(), diff = state.other >= 0;
    var fin = vals.filter(function (v) { return v !== null; });
    var lo = Math.min.apply(null, fin.concat([Infinity])), hi = Math.max.apply(null, fin.concat([-Infinity]));
    var span = diff ? Math.max(Math.abs(lo), Math.abs(hi)) || 1 : (hi - lo) || 1;
    document.getElementById("grid-title").textContent = diff
      ? "Change in " + label(state.metric) + " (" + s.label + " minus " + DATA.sets[state.other].label + ")"
      : label(state.metric) + " per head";
    gridCanvas.width = G.left + sh[1] * G.cell + 4;
    gridCanvas.height = G.top + sh[0] * G.cell + 4;
    var g = gridCanvas.getContext("2d");
    g.clearRect(0, 0, gridCanvas.width, gridCanvas.height);
    g.font = "11px sans-serif"; g.fillStyle = "#333"; g.textAlign = "center"; g.textBaseline = "middle";
    for (var h = 0; h < sh[1]; h++) { g.fillText("H" + h, G.left + (h + 0.5) * G.cell, G.top / 2); }
    g.textAlign = "right";
    for (var l = 0; l < sh[0]; l++) { g.fillText("L" + l, G.left - 4, G.top + (l + 0.5) * G.cell); }
    for (var i = 0; i < rows(s); i++) {
      var x = G.left + s.heads.head[i] * G.cell, y = G.top + s.heads.layer[i] * G.cell, v = vals[i];
      g.fillStyle = v === null ? "#ccc" : rgb(diff ? mix(DIVERGE, 0.5 + v / (2 * span)) : mix(VIRIDIS, (v - lo) / span));
      g.fillRect(x, y, G.cell - 1, G.cell - 1);
      if (value(s, "flagged", i)) { g.fillStyle = "#d62828"; g.beginPath(); g.moveTo(x, y); g.lineTo(x + 9, y); g.lineTo(x, y + 9); g.fill(); }
      if (s.heads.layer[i] === state.layer && s.heads.head[i] === state.head) {
        g.strokeStyle = "#000"; g.lineWidth = 3; g.strokeRect(x + 1.5, y + 1.5, G.cell - 4, G.cell - 4);
      }
    }
  }
  function gridCell(ev) {
    var r = gridCanvas.getBoundingClientRect(), sh = shape();
    var h = Math.floor((ev.clientX - r.left - G.left) / G.cell), l = Math.floor((ev.clientY - r.top - G.top) / G.cell);
    return (l >= 0 && l < sh[0] && h >= 0 && h < sh[1]) ? [l, h] : null;
  }
  gridCanvas.addEventListener("click", function (ev) { var c = gridCell(ev); if (c) { select(c[0], c[1]); } });
  gridCanvas.addEventListener("mousemove", function (ev) {
    var c = gridCell(ev);
    if (!c) { gridStatus.textContent = ""; return; }
    var i = rowOf(set(), c[0], c[1]), v = gridValues()[i];
    gridStatus.textContent = "layer " + c[0] + ", head " + c[1] + ": " + (state.other >= 0 ? "change in " : "") +
      label(state.metric) + " " + (v === null ? "\u2013" : String(v)) + (value(set(), "flagged", i) ? " (flagged)" : "");
  });

  /* --- tables ---------------------------------------------------------------------------------- */
  function passes(f, v) {
    if (f === undefined || f === "") { return true; }
    if (f === "yes" || f === "no") { return (v === true) === (f === "yes"); }
    var m, x = v === null ? NaN : v;
    if ((m = /^\s*(-?[\d.eE+-]+)\s*\.\.\s*(-?[\d.eE+-]+)\s*$/.exec(f))) { return x >= +m[1] && x <= +m[2]; }
    if ((m = /^\s*(>=|<=|>|<|=)?\s*(-?[\d.eE+-]+)\s*$/.exec(f))) {
      var t = +m[2];
      switch (m[1]) { case ">": return x > t; case "<": return x < t; case ">=": return x >= t; case "<=": return x <= t; default: return x === t; }
    }
    return true;
  }
  function table(box, id, cols, getter, n, opts) {
    var order = [];
    for (var i = 0; i < n; i++) {
      var ok = true;
      cols.forEach(function (c) { if (!passes(state.filters[id + ":" + c.key], getter(c.key, i))) { ok = false; } });
      if (ok) { order.push(i); }
    }
    var sk = state.sort[id] || { key: "layer", dir: 1 };
    order.sort(function (a, b) {
      var x = getter(sk.key, a), y = getter(sk.key, b);
      if (x === null || x === undefined) { return 1; }
      if (y === null || y === undefined) { return -1; }
      x = +x; y = +y;
      return (x < y ? -1 : x > y ? 1 : (a - b)) * sk.dir;
    });
    var head = el("tr"), filt = el("tr", { cls: "filters" });
    cols.forEach(function (c) {
      var th = el("th", { "data-col": c.key, title: c.title || c.key, text: c.label });
      if (sk.key === c.key) { th.setAttribute("aria-sort", sk.dir > 0 ? "ascending" : "descending"); }
      th.addEventListener("click", function () {
        state.sort[id] = { key: c.key, dir: sk.key === c.key ? -sk.dir : (c.bool ? -1 : 1) };
        renderTables();
      });
      head.appendChild(th);
      var fkey = id + ":" + c.key, input;
      if (c.bool) {
        input = el("select", { "data-filter": c.key });
        ["", "yes", "no"].forEach(function (o) { input.appendChild(el("option", { value: o, text: o || "any" })); });
      } else {
        input = el("input", { "data-filter": c.key, placeholder: c.key === "layer" || c.key === "head" ? "=" : "> <" });
      }
      input.value = state.filters[fkey] || "";
      input.addEventListener("change", function () { state.filters[fkey] = input.value; renderTables(); });
      filt.appendChild(el("th", {}, [input]));
    });
    var body = el("tbody");
    order.forEach(function (i) {
      var l = getter("layer", i), h = getter("head", i);
      var tr = el("tr", { "data-head": "L" + l + "H" + h });
      if (opts.flagged(i)) { tr.className = "flagged"; }
      if (l === state.layer && h === state.head) { tr.className += " sel"; }
      cols.forEach(function (c) {
        var v = getter(c.key, i);
        var td = el("td", { text: c.bool ? (v ? "\u2713" : "\u00b7") : fmt(v, c.digits) });
        if (c.bool) { td.className = v ? "yes" : "no"; } else if (typeof v === "number") { td.title = String(v); }
        tr.appendChild(td);
      });
      if (!opts.noclick) { tr.addEventListener("click", function () { select(l, h); }); }
      body.appendChild(tr);
    });
    box.textContent = "";
    box.appendChild(el("table", { id: id }, [el("thead", {}, [head, filt]), body]));
    return order;
  }
  var shownOrder = [];
  function headColumns() {
    var s = set(), cols = [{ key: "layer", label: "layer" }, { key: "head", label: "head" }];
    DATA.metrics.forEach(function (m) { if (m in s.heads) { cols.push({ key: m, label: label(m), title: m }); } });
    FLAG_NAMES.forEach(function (f) { if (f in s.heads) { cols.push({ key: f, label: f, bool: true }); } });
    return cols;
  }
  function renderTables() {
    var s = set();
    shownOrder = table(tableBox, "heads", headColumns(), function (k, i) { return value(s, k, i); }, rows(s),
      { flagged: function (i) { return value(s, "flagged", i); } });
    changeBox.textContent = "";
    if (state.other >= 0) {
      var o = DATA.sets[state.other], cols = [{ key: "layer", label: "layer" }, { key: "head", label: "head" }];
      DATA.metrics.forEach(function (m) { if (m in s.heads && m in o.heads && m !== "queries") { cols.push({ key: m, label: "\u0394 " + label(m), title: m, digits: 4 }); } });
      cols.push({ key: "flags", label: "flags changed", text: true });
      var get = function (k, i) {
        if (k === "layer" || k === "head") { return s.heads[k][i]; }
        if (k === "flags") {
          return FLAG_NAMES.filter(function (f) { return f !== "flagged" && f in s.heads && f in o.heads && s.heads[f][i] !== o.heads[f][i]; })
            .map(function (f) { return (s.heads[f][i] ? "+" : "\u2212") + f; }).join(" ");
        }
        var a = s.heads[k][i], b = o.heads[k][i];
        return a === null || b === null ? null : a - b;
      };
      changeBox.appendChild(el("h2", { text: "Metric changes per head: " + s.label + " minus " + o.label }));
      var box = el("div");
      changeBox.appendChild(box);
      table(box, "changes", cols, get, rows(s), { flagged: function (i) { return value(s, "flagged", i) !== value(o, "flagged", i); } });
    }
    var lay = run().layers, lc = Object.keys(lay);
    table(layerBox, "layers", lc.map(function (k) { return { key: k, label: label(k), title: k }; }),
      function (k, i) { return k === "head" ? null : lay[k][i]; }, (lay.layer || []).length, { flagged: function () { return false; }, noclick: true });
  }
  csvBtn.addEventListener("click", function () {
    var s = set(), cols = headColumns();
    var lines = [cols.map(function (c) { return c.key; }).concat(["reasons"]).join(",")];
    shownOrder.forEach(function (i) {
      var cells = cols.map(function (c) { var v = value(s, c.key, i); return v === null ? "" : String(v); });
      cells.push('"' + (s.heads.reasons[i] || []).join("; ").replace(/"/g, '""') + '"');
      lines.push(cells.join(","));
    });
    download(run().name + "-heads.csv", new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
  });

  /* --- one head: patterns ---------------------------------------------------------------------- */
  function examplesOf(s) {
    var r = s.run, out = [];
    DATA.runs[r].examples.forEach(function (ex, j) { if (ex.stage === s.stage) { out.push({ run: r, index: j, info: ex }); } });
    return out;
  }
  function matching(s, ex) {
    return examplesOf(s).filter(function (e) {
      return e.info.example === ex.info.example && e.info.tokens.join("\u0000") === ex.info.tokens.join("\u0000");
    })[0] || null;
  }
  function patternFigure(ex, kind, idx, caption) {
    var q = bytes(ex.run, ex.index, kind, idx);
    var fig = el("figure", { cls: "pattern-fig" });
    fig.appendChild(el("figcaption", { text: caption }));
    if (!q) { fig.appendChild(el("p", { cls: "muted", text: "not in this page (see the notice above)" })); return fig; }
    var strips = PAT[ex.run].examples[ex.index];
    var fig2 = drawPattern(ex.info, q, strips.entropy[idx], strips.entropy_norm[idx], strips.first[idx]);
    var status = el("div", { cls: "status" });
    fig2.status = status;
    var btn = el("button", { type: "button", cls: "export-png", text: "Export PNG" });
    btn.addEventListener("click", function () {
      download(run().name + "-L" + state.layer + "H" + state.head + "-example" + ex.info.example + ".png",
        fig2.canvas.toDataURL("image/png"));
    });
    fig.appendChild(fig2.canvas);
    fig.appendChild(status);
    fig.appendChild(btn);
    return fig;
  }
  function drawPattern(info, q, ent, entNorm, first) {
    var n = info.tokens.length, hide = state.hideSink && n > 1, k0 = hide ? 1 : 0, nk = n - k0;
    var cell = Math.max(5, Math.min(18, Math.floor(440 / n)));
    var probe = document.createElement("canvas").getContext("2d");
    probe.font = "11px sans-serif";
    var lw = 8 + Math.min(120, Math.max.apply(null, info.tokens.map(function (t) { return probe.measureText(t).width; })));
    var L = { left: lw, top: lw, cell: cell, n: n, k0: k0, nk: nk, strip: Math.max(10, cell) };
    var canvas = el("canvas", { cls: "pattern" });
    canvas.width = L.left + nk * cell + 8 + L.strip * (hide ? 2 : 1) + 6;
    canvas.height = L.top + n * cell + 6;
    var w = function (i, k) {
      if (info.causal && k > i) { return null; }
      var v = Math.pow(q[i * n + k] / 255, 2);
      if (hide) { var rest = 1 - (first[i] === null ? 0 : first[i]); v = rest > 1e-9 ? v / rest : 0; }
      return v;
    };
    var bmp = document.createElement("canvas");
    bmp.width = nk; bmp.height = n;
    var bc = bmp.getContext("2d"), img = bc.createImageData(nk, n);
    for (var i = 0; i < n; i++) {
      for (var k = k0; k < n; k++) {
        var v = w(i, k), c = v === null ? [221, 221, 221] : LUT[Math.max(0, Math.min(255, Math.round(Math.sqrt(v) * 255)))];
        var o = 4 * (i * nk + k - k0);
        img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
      }
    }
    bc.putImageData(img, 0, 0);
    var obj = { canvas: canvas, L: L, info: info, weight: w, ent: ent, entNorm: entNorm, first: first, hover: null };
    obj.paint = function () { paintPattern(obj, bmp); };
    obj.paint();
    canvas.addEventListener("mousemove", function (ev) { patternHover(obj, ev); });
    canvas.addEventListener("mouseleave", function () { obj.hover = null; obj.paint(); if (obj.status) { obj.status.textContent = ""; } });
    return obj;
  }
  function paintPattern(o, bmp) {
    var c = o.canvas.getContext("2d"), L = o.L, n = L.n, cell = L.cell, t = o.info.tokens;
    c.fillStyle = "#fff"; c.fillRect(0, 0, o.canvas.width, o.canvas.height);
    c.imageSmoothingEnabled = false;
    c.drawImage(bmp, L.left, L.top, L.nk * cell, n * cell);
    if (o.info.causal) {
      c.save(); c.beginPath();
      for (var i = 0; i < n; i++) {
        var kFrom = Math.max(i + 1, L.k0);
        if (kFrom < n) { c.rect(L.left + (kFrom - L.k0) * cell, L.top + i * cell, (n - kFrom) * cell, cell); }
      }
      c.clip(); c.strokeStyle = "#999"; c.lineWidth = 1;
      for (var d = -n * cell; d < L.nk * cell + n * cell; d += 6) {
        c.beginPath(); c.moveTo(L.left + d, L.top); c.lineTo(L.left + d + n * cell, L.top + n * cell); c.stroke();
      }
      c.restore();
    }
    c.font = "11px sans-serif"; c.textBaseline = "middle";
    var hi = o.hover && o.hover.token !== undefined ? o.hover.token : -1;
    var clip = function (s) { return s.length > 16 ? s.slice(0, 15) + "\u2026" : s; };
    c.textAlign = "right";
    for (var q = 0; q < n; q++) {
      c.fillStyle = q === hi ? "#d62828" : "#222"; c.fillText(clip(t[q]), L.left - 4, L.top + (q + 0.5) * cell);
    }
    c.save(); c.translate(L.left, L.top - 4); c.rotate(-Math.PI / 2); c.textAlign = "left";
    for (var k = L.k0; k < n; k++) {
      c.fillStyle = k === hi ? "#d62828" : "#222"; c.fillText(clip(t[k]), 0, (k - L.k0 + 0.5) * cell);
    }
    c.restore();
    var sx = L.left + L.nk * cell + 8;
    for (var r = 0; r < n; r++) {
      var e = o.entNorm ? o.entNorm[r] : null;
      c.fillStyle = e === null || e === undefined ? "#eee" : rgb(mix(VIRIDIS, e));
      c.fillRect(sx, L.top + r * cell, L.strip, cell);
      if (L.k0) {
        var f = o.first ? o.first[r] : null;
        c.fillStyle = f === null ? "#eee" : rgb(LUT[Math.round(Math.sqrt(f) * 255)]);
        c.fillRect(sx + L.strip, L.top + r * cell, L.strip, cell);
      }
    }
    c.strokeStyle = "#d62828"; c.lineWidth = 2;
    if (hi >= 0) {
      c.strokeRect(L.left, L.top + hi * cell, L.nk * cell, cell);
      if (hi >= L.k0) { c.strokeRect(L.left + (hi - L.k0) * cell, L.top, cell, n * cell); }
    } else if (o.hover && o.hover.q !== undefined) {
      c.lineWidth = 1.5; c.strokeStyle = "#000";
      c.strokeRect(L.left + (o.hover.k - L.k0) * cell, L.top + o.hover.q * cell, cell, cell);
    }
  }
  function top3(pairs) {
    return pairs.filter(function (p) { return p[1] !== null; }).sort(function (a, b) { return b[1] - a[1]; }).slice(0, 3)
      .map(function (p) { return "'" + p[0] + "' " + p[1].toFixed(3); }).join(", ");
  }
  function patternHover(o, ev) {
    var r = o.canvas.getBoundingClientRect(), L = o.L, n = L.n, t = o.info.tokens;
    var x = ev.clientX - r.left, y = ev.clientY - r.top;
    var qi = Math.floor((y - L.top) / L.cell), kj = Math.floor((x - L.left) / L.cell) + L.k0, text = "";
    var sx = L.left + L.nk * L.cell + 8, i, list;
    o.hover = null;
    if (x < L.left && qi >= 0 && qi < n) { o.hover = { token: qi }; }
    else if (y < L.top && kj >= L.k0 && kj < n) { o.hover = { token: kj }; }
    if (o.hover) {
      var tok = o.hover.token, to = [], from = [];
      for (i = L.k0; i < n; i++) { to.push([t[i], o.weight(tok, i)]); from.push([t[i], o.weight(i, tok)]); }
      text = "'" + t[tok] + "' attends to " + top3(to) + "; attended by " + top3(from);
    } else if (qi >= 0 && qi < n && x >= sx && x < sx + L.strip * (L.k0 ? 2 : 1)) {
      list = x < sx + L.strip ? "row entropy " + fmt(o.ent[qi], 4) + " nats (" + fmt(o.entNorm[qi], 4) + " of log n)"
        : "mass on position 0: " + fmt(o.first[qi], 4);
      text = "query " + qi + " '" + t[qi] + "': " + list;
    } else if (qi >= 0 && qi < n && kj >= L.k0 && kj < n && x >= L.left) {
      var v = o.weight(qi, kj);
      o.hover = { q: qi, k: kj };
      text = "query '" + t[qi] + "' \u2192 key '" + t[kj] + "': " + (v === null ? "masked (causal)" : "\u2248 " + v.toFixed(4) + (L.k0 ? " of the rest after position 0" : ""));
    }
    o.paint();
    if (o.status) { o.status.textContent = text; }
  }

  function renderPanel() {
    panel.textContent = "";
    var s = set(), sh = shape();
    if (state.layer < 0) { panel.appendChild(el("p", { cls: "muted", text: "Click a head in the grid or the table (or press n) to see its patterns." })); return; }
    var i = rowOf(s, state.layer, state.head), reasons = s.heads.reasons[i] || [];
    panel.appendChild(el("h2", { id: "head-title", text: "Layer " + state.layer + ", head " + state.head + " \u2014 " + s.label }));
    if (reasons.length) {
      panel.appendChild(el("ul", { cls: "reasons", id: "reasons" }, reasons.map(function (r) { return el("li", { text: r }); })));
    } else { panel.appendChild(el("p", { id: "reasons", cls: "muted", text: "not flagged" })); }
    var shown = ["gtd", "direct_entropy_norm", "indirect_entropy_norm", "sink_mass", "first_mass", "self_mass", "bp_shift"];
    panel.appendChild(el("p", { cls: "values" }, [shown.filter(function (m) { return value(s, m, i) !== null && value(s, m, i) !== undefined; })
      .map(function (m) { return label(m) + " " + fmt(value(s, m, i)); }).join(" \u00b7 ")]));
    if (state.hideSink) {
      panel.appendChild(el("p", { cls: "notice", id: "sink-note", text: "Position 0 is hidden and each row renormalized over the other keys. " +
        "This head's sink mass is " + fmt(value(s, "sink_mass", i)) + " and its mass on position 0 " + fmt(value(s, "first_mass", i)) +
        " (metrics of the whole run); the second strip shows each query's mass on position 0 in this example." }));
    }
    var exs = examplesOf(s), o = state.other >= 0 ? DATA.sets[state.other] : null;
    if (!exs.length) { panel.appendChild(el("p", { cls: "muted", text: "This run kept no patterns (scan --patterns N)." })); return; }
    panel.appendChild(el("p", { cls: "sub", text: "Queries down, keys across; darker = more weight. The strip beside each pattern is the row entropy of each query (colour: over log n; hover for nats)." +
      (exs[0].info.causal ? " Hatched cells are keys after the query (causal mask)." : "") }));
    var idx = rowOf(s, state.layer, state.head);
    exs.forEach(function (ex) {
      var info = ex.info, row = el("div", { cls: "pair" });
      row.appendChild(patternFigure(ex, "weight", idx, "example " + info.example + (info.stage ? " (" + info.stage + " training)" : "") + ", " + info.tokens.length + " tokens" + (info.plain && PAT[ex.run].examples[ex.index].plain[idx] ? ": refined (SAOBP)" : "")));
      if (state.plain && PAT[ex.run].examples[ex.index].plain[idx]) { row.appendChild(patternFigure(ex, "plain", idx, "plain attention before SAOBP")); }
      if (o) {
        var m = matching(o, ex);
        row.appendChild(m ? patternFigure(m, "weight", idx, o.label) : el("p", { cls: "muted", text: o.label + " did not keep this example." }));
      }
      panel.appendChild(row);
      var seg = PAT[ex.run].examples[ex.index].segments[idx];
      if (info.split !== null && seg) {
        panel.appendChild(el("p", { cls: "values segments", text: "Segments (split after '" + info.tokens[info.split - 1] + "'): A\u2192A " + fmt(seg[0]) +
          ", A\u2192B " + fmt(seg[1]) + ", B\u2192A " + fmt(seg[2]) + ", B\u2192B " + fmt(seg[3]) + " (mean attention mass per query)" }));
      }
    });
  }

  /* --- selection, address, keys ---------------------------------------------------------------- */
  function select(layer, head, fromHash) {
    var sh = shape();
    if (layer < 0 || head < 0 || layer >= sh[0] || head >= sh[1]) { return; }
    state.layer = layer; state.head = head;
    if (!fromHash && location.hash !== "#L" + layer + "H" + head) { history.replaceState(null, "", "#L" + layer + "H" + head); }
    drawGrid(); renderTables(); renderPanel();
  }
  function fromHash() {
    var m = /^#L(\d+)H(\d+)$/.exec(location.hash);
    if (m) { select(+m[1], +m[2], true); }
  }
  function step(dir) {
    var s = set(), fl = [];
    shownOrder.forEach(function (i) { if (value(s, "flagged", i)) { fl.push(i); } });
    if (!fl.length) { return; }
    var cur = fl.indexOf(rowOf(s, state.layer, state.head));
    var next = fl[cur < 0 ? (dir > 0 ? 0 : fl.length - 1) : (cur + dir + fl.length) % fl.length];
    select(s.heads.layer[next], s.heads.head[next]);
  }
  document.addEventListener("keydown", function (ev) {
    var tag = (ev.target && ev.target.tagName) || "";
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var sh = shape(), l = Math.max(0, state.layer), h = Math.max(0, state.head);
    if (ev.key === "n") { step(1); } else if (ev.key === "p") { step(-1); }
    else if (ev.key === "ArrowRight") { select(l, Math.min(sh[1] - 1, h + 1)); }
    else if (ev.key === "ArrowLeft") { select(l, Math.max(0, h - 1)); }
    else if (ev.key === "ArrowDown") { select(Math.min(sh[0] - 1, l + 1), h); }
    else if (ev.key === "ArrowUp") { select(Math.max(0, l - 1), h); }
    else { return; }
    ev.preventDefault();
  });
  window.addEventListener("hashchange", fromHash);
  setSel.addEventListener("change", function () { state.set = +setSel.value; fillOther(); drawGrid(); renderTables(); renderPanel(); });
  otherSel.addEventListener("change", function () { state.other = +otherSel.value; drawGrid(); renderTables(); renderPanel(); });
  metricSel.addEventListener("change", function () { state.metric = metricSel.value; drawGrid(); });
  sinkBox.addEventListener("change", function () { state.hideSink = sinkBox.checked; renderPanel(); });
  plainBox.addEventListener("change", function () { state.plain = plainBox.checked; renderPanel(); });

  if (!DATA.runs.some(function (r) { return r.examples.some(function (e) { return e.plain; }); })) {
    document.getElementById("plain-label").style.display = "none";
  }
  fillOther();
  drawGrid();
  renderTables();
  renderPanel();
  fromHash();
  document.body.setAttribute("data-ready", "1");
}());
