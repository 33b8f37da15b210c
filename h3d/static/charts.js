/* h3d charts: small SVG line and scatter charts with ticks, units, hover readouts and legends.
 * No library, no network. Works under a Content-Security-Policy of 'self': no inline style
 * attributes are written (positions are set through the CSSOM, which CSP allows).
 * Exposes one global, H3Charts.
 */
"use strict";
(function (global) {
  // Okabe & Ito (2008): distinguishable with every common form of colour blindness.
  // Yellow (#F0E442) is left out: too faint on white. Dashes tell series apart as well.
  const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#000000"];
  const DASHES = ["", "6 3", "2 2", "8 3 2 3", "4 4", "1 3", "10 4"];

  const esc = s => String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

  /** A number for people: 3 significant digits, k/M/G or m/µ prefixes (0.01 to 1000 plain,
   * beyond those exponents). Rounded first, so that 999.96 reads 1k and 0.0099996 reads 0.01. */
  function num(v, digits = 3) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "–";
    const r = Number(v.toPrecision(digits)), a = Math.abs(r);
    if (a === 0) return "0";
    if (a >= 1e12 || a < 1e-6) return trim(r.toExponential(digits - 1));
    const rungs = [[1e9, "G"], [1e6, "M"], [1e3, "k"], [0.01, ""], [1e-3, "m"], [1e-6, "µ"]];
    const [f, p] = rungs.find(([f]) => a >= f);
    return trim((p ? r / f : r).toPrecision(digits)) + p;
  }
  // Units a prefix joins: "2.23 mJ", "224 µs". Others follow the number as num() writes it.
  const SI_UNITS = new Set(["s", "J", "W", "g", "Wh"]);

  /** A quantity for people: num()'s figure with its unit, the prefix written with the unit
   * ("2.23 mJ", not "2.23m J", which reads as metre-joules); "–" when unknown. */
  function qty(v, unit, digits = 3) {
    const s = num(v, digits);
    if (s === "–" || !unit) return s;
    const m = /^(.*?)([kMGmµ]?)$/.exec(s);
    return SI_UNITS.has(unit) ? `${m[1]} ${m[2]}${unit}` : `${s} ${unit}`;
  }
  function trim(s) { return s.includes("e") || !s.includes(".") ? s : s.replace(/\.?0+$/, ""); }

  /** True when [lo, hi] is one value, or spans no more than the rounding of floats: a flat
   *  loss's rolling or bucket means differ by 1e-17, and ticks a step that small apart never
   *  advance (v + step === v). */
  function isFlat(lo, hi) {
    return !(hi - lo > 1e-9 * Math.max(Math.abs(lo), Math.abs(hi)));
  }

  /** [lo, hi] widened around a flat range: ±5 % of its value, ±1 about 0. */
  function padFlat(lo, hi) {
    const mid = (lo + hi) / 2, d = Math.abs(mid) * 0.05 || 1;
    return [mid - d, mid + d];
  }

  /** Tick positions k·step covering [lo, hi], computed (not accumulated) from an integer k. */
  function ladder(lo, hi, step) {
    const out = [], k0 = Math.ceil(lo / step - 1e-9);
    for (let k = k0; k - k0 <= 1000; k++) {
      const v = k * step;
      if (v > hi + step * 1e-9) break;
      out.push(k === 0 ? 0 : v);
    }
    return out;
  }

  /** Round tick positions covering [lo, hi] (Heckbert's nice numbers). A flat or
   *  non-finite range gets a padded one: never a zero or NaN step. */
  function ticks(lo, hi, n = 5) {
    if (!Number.isFinite(lo) || !Number.isFinite(hi)) { lo = 0; hi = 1; }
    if (isFlat(lo, hi)) [lo, hi] = padFlat(lo, hi);
    const raw = (hi - lo) / Math.max(1, n), mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || 10 * mag;
    return {ticks: ladder(lo, hi, step), step};
  }

  // Time ticks: steps a clock reads, and the unit their labels are written in.
  const TIME_STEPS = [
    ...[-3, -2, -1, 0, 1].flatMap(k => [1, 2, 5].map(m => [m * Math.pow(10, k), "s", 1])),
    [30, "s", 1], [60, "min", 60], [120, "min", 60], [300, "min", 60], [600, "min", 60],
    [900, "min", 60], [1800, "min", 60],
    ...[1, 2, 3, 6, 12].map(h => [3600 * h, "h", 3600]),
    [86400, "d", 86400], [2 * 86400, "d", 86400], [7 * 86400, "d", 86400],
  ].filter(([step]) => step !== 50);  // 50 s: 30 s, then whole minutes, read better

  /** Ticks of a time axis in seconds: steps of 1/2/5 × 10^k s, 30 s, 1/2/5/10/15/30 min, hours,
   *  days; labels plain numbers in the unit of the step (s, min, h, d), which the axis names. */
  function timeTicks(lo, hi, n = 5) {
    if (!Number.isFinite(lo) || !Number.isFinite(hi)) { lo = 0; hi = 1; }
    if (isFlat(lo, hi)) [lo, hi] = padFlat(lo, hi);
    const raw = (hi - lo) / Math.max(1, n);
    let pick = TIME_STEPS.find(([step]) => step >= raw);
    if (!pick) { const d = ticks(lo / 86400, hi / 86400, n).step * 86400; pick = [d, "d", 86400]; }
    const [step, unit, per] = pick;
    const decimals = Math.max(0, Math.ceil(-Math.log10(step / per) - 1e-9));
    const fmt = v => String(Number((v / per).toFixed(decimals)));  // "0", "0.5", "90": no -0
    return {ticks: ladder(lo, hi, step), step, unit, fmt};
  }

  /** A readout of a duration in seconds: "42.5 s", "2:41 min", "1:05:20 h". */
  function duration(v) {
    if (!Number.isFinite(v)) return "–";
    if (Math.abs(v) < 60) return qty(v, "s");
    const sign = v < 0 ? "−" : "", a = Math.round(Math.abs(v));
    const h = Math.floor(a / 3600), m = Math.floor(a % 3600 / 60), sec = a % 60;
    const two = x => String(x).padStart(2, "0");
    return h ? `${sign}${h}:${two(m)}:${two(sec)} h` : `${sign}${m}:${two(sec)} min`;
  }

  /** ``v`` as 0 when it is rounding noise of quantities of size ``scale`` (|v| within 1e-12
   *  of it): a sum of gains that cancel, +0.1 + 0.2 − 0.3 bits, is 5.6e-17, not a figure. */
  function nearZero(v, scale) {
    if (v === null || v === undefined || !Number.isFinite(v)) return v;
    return Math.abs(v) <= 1e-12 * Math.abs(scale) ? 0 : v;
  }

  function extent(values, includeZero) {
    let lo = Infinity, hi = -Infinity;
    for (const v of values) if (Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
    if (lo === Infinity) return [0, 1];
    if (includeZero) { lo = Math.min(lo, 0); hi = Math.max(hi, 0); }
    if (isFlat(lo, hi)) return padFlat(lo, hi);
    const pad = (hi - lo) * 0.04;
    return [includeZero && lo === 0 ? 0 : lo - pad, hi + pad];
  }

  /** A hover readout: an axis's own format, else num's prefix joined with the unit. */
  function withUnit(fmt, v, ax) {
    if (ax.time) return duration(v);
    if (ax.fmt) return ax.unit ? `${fmt(v)} ${ax.unit}` : fmt(v);
    return qty(v, ax.unit);
  }

  function axisLabel(ax, unit) {
    const u = unit || ax.unit;
    return u ? `${ax.label} (${u})` : ax.label;
  }

  // Tick labels are measured in the font svg.plot text uses (app.css), so that the left margin
  // fits the widest: "1.00e+32" is twice as wide as "0.25". Without a canvas: 0.62 em a glyph.
  let measure = null;
  function textWidth(s) {
    if (measure === null) {
      const c = typeof document !== "undefined" && document.createElement("canvas");
      measure = (c && c.getContext && c.getContext("2d")) || false;
      if (measure) measure.font = "11px system-ui, sans-serif";
    }
    return measure ? measure.measureText(s).width : 6.8 * s.length;
  }

  function frame(el, opt) {
    const W = Math.max(320, Math.floor(opt.width || el.clientWidth || 560)), H = opt.height || 260;
    const M = {l: 62, r: 14, t: 10, b: 44};
    return {W, H, M, iw: W - M.l - M.r, ih: H - M.t - M.b};
  }

  /** Ticks, grid and axis titles. Widens the frame's left margin (f.M.l, f.iw) to fit the y
   *  tick labels between the rotated y title (x 0 to ~20) and the ticks' 7 px gap. */
  /** num() with as many digits as it takes for no two ticks to read alike: ticks 0.0005 apart
   *  about 1 read "1, 1, 0.999" with 3. */
  function tickFormat(values) {
    for (let d = 3; d < 12; d++) {
      const labels = values.map(v => num(v, d));
      if (new Set(labels).size === labels.length) return v => num(v, d);
    }
    return v => num(v, 12);
  }

  function axes(f, xs, ys, opt) {
    const yt = ticks(ys[0], ys[1], 5).ticks.filter(v => v >= ys[0] && v <= ys[1]);
    const yf = opt.y.fmt || tickFormat(yt);
    const widest = Math.max(0, ...yt.map(v => textWidth(yf(v))));
    f.M.l = Math.max(f.M.l, Math.ceil(widest) + 30);
    f.iw = f.W - f.M.l - f.M.r;
    const X = v => f.M.l + f.iw * (v - xs[0]) / (xs[1] - xs[0]);
    const Y = v => f.M.t + f.ih - f.ih * (v - ys[0]) / (ys[1] - ys[0]);
    // a time axis (opt.x.time, seconds) ticks at clock steps and is labelled in their unit
    const nx = Math.max(3, Math.round(f.iw / 90));
    const xtk = opt.x.time ? timeTicks(xs[0], xs[1], nx) : ticks(xs[0], xs[1], nx);
    const xt = xtk.ticks.filter(v => v >= xs[0] && v <= xs[1]);
    const xf = opt.x.time ? xtk.fmt : opt.x.fmt || tickFormat(xt);
    let s = `<g class="grid">`;
    for (const v of yt) s += `<line x1="${f.M.l}" x2="${f.M.l + f.iw}" y1="${Y(v).toFixed(1)}" y2="${Y(v).toFixed(1)}"/>`;
    for (const v of xt) s += `<line y1="${f.M.t}" y2="${f.M.t + f.ih}" x1="${X(v).toFixed(1)}" x2="${X(v).toFixed(1)}"/>`;
    s += `</g><g class="axis">`;
    s += `<line x1="${f.M.l}" x2="${f.M.l + f.iw}" y1="${f.M.t + f.ih}" y2="${f.M.t + f.ih}"/>`;
    s += `<line x1="${f.M.l}" x2="${f.M.l}" y1="${f.M.t}" y2="${f.M.t + f.ih}"/>`;
    for (const v of xt) s += `<line x1="${X(v).toFixed(1)}" x2="${X(v).toFixed(1)}" y1="${f.M.t + f.ih}" y2="${f.M.t + f.ih + 4}"/><text class="tick" x="${X(v).toFixed(1)}" y="${f.M.t + f.ih + 16}" text-anchor="middle">${esc(xf(v))}</text>`;
    for (const v of yt) s += `<line x1="${f.M.l - 4}" x2="${f.M.l}" y1="${Y(v).toFixed(1)}" y2="${Y(v).toFixed(1)}"/><text class="tick" x="${f.M.l - 7}" y="${(Y(v) + 4).toFixed(1)}" text-anchor="end">${esc(yf(v))}</text>`;
    s += `<text class="label" x="${f.M.l + f.iw / 2}" y="${f.H - 6}" text-anchor="middle">${esc(axisLabel(opt.x, opt.x.time ? xtk.unit : ""))}</text>`;
    s += `<text class="label" transform="translate(13 ${f.M.t + f.ih / 2}) rotate(-90)" text-anchor="middle">${esc(axisLabel(opt.y))}</text>`;
    return {svg: s + `</g>`, X, Y};
  }

  function shell(el, opt, f, body) {
    const legend = (opt.legend || []).map(l =>
      `<li><svg width="26" height="10" aria-hidden="true"><line x1="1" x2="25" y1="5" y2="5" stroke="${l.color}" stroke-width="${l.width || 2.5}"${l.dash ? ` stroke-dasharray="${l.dash}"` : ""}${l.opacity ? ` stroke-opacity="${l.opacity}"` : ""}/></svg>${esc(l.name)}</li>`).join("");
    el.classList.add("chart");
    el.innerHTML = (opt.title ? `<div class="chart-title">${esc(opt.title)}</div>` : "") +
      `<div class="chart-body"><svg class="plot" width="${f.W}" height="${f.H}" viewBox="0 0 ${f.W} ${f.H}" role="img" aria-label="${esc(opt.title || "chart")}">${body}</svg><div class="tip" hidden></div></div>` +
      (legend ? `<ul class="legend">${legend}</ul>` : "") + (opt.warn ? `<div class="chart-warn">${esc(opt.warn)}</div>` : "") + (opt.note ? `<div class="chart-note">${esc(opt.note)}</div>` : "");
    return {svg: el.querySelector("svg.plot"), tip: el.querySelector(".tip")};
  }

  function placeTip(tip, svg, px, py, html) {
    tip.innerHTML = html;
    tip.hidden = false;
    const w = tip.offsetWidth, sw = svg.clientWidth || svg.width.baseVal.value;
    tip.style.left = (px + 14 + w > sw ? Math.max(0, px - 14 - w) : px + 14) + "px";
    tip.style.top = Math.max(0, py - 10) + "px";
  }

  function nearestByX(pts, x) {
    let lo = 0, hi = pts.length - 1;
    while (hi - lo > 1) { const m = (lo + hi) >> 1; if (pts[m][0] < x) lo = m; else hi = m; }
    return Math.abs(pts[lo][0] - x) <= Math.abs(pts[hi][0] - x) ? pts[lo] : pts[hi];
  }

  /**
   * Line chart. opt: {title, x: {label, unit, fmt?}, y: {label, unit, fmt?, zero?},
   *   series: [{name, points: [[x, y], ...], color?, dash?, area?: bool, width?, opacity?}],
   *   marks: [{x, label}] (vertical markers), hlines: [{y, label, color?}], note?, warn?, height?}
   * Every series is drawn with all its points: one path command per point.
   */
  function line(el, opt) {
    const f = frame(el, opt);
    const series = opt.series.map((s, i) => ({
      ...s,
      color: s.color || PALETTE[i % PALETTE.length],
      dash: s.dash !== undefined ? s.dash : DASHES[i % DASHES.length],
      points: s.points.filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1])).slice().sort((a, b) => a[0] - b[0]),
    }));
    const all = series.flatMap(s => s.points);
    if (!all.length) {
      el.classList.add("chart");
      el.innerHTML = (opt.title ? `<div class="chart-title">${esc(opt.title)}</div>` : "") + `<div class="empty">${esc(opt.empty || "no data yet")}</div>`;
      return;
    }
    const hl = opt.hlines || [], marks = opt.marks || [];
    const xs = extent(all.map(p => p[0]).concat(marks.map(m => m.x)), false);
    if (opt.x.zero && xs[0] > 0) xs[0] = 0;
    const ys = extent(all.map(p => p[1]).concat(hl.map(h => h.y)), !!opt.y.zero || series.some(s => s.area));
    const a = axes(f, xs, ys, opt);
    let body = a.svg;
    body += `<defs><clipPath id="clip-${uid}"><rect x="${f.M.l}" y="${f.M.t}" width="${f.iw}" height="${f.ih}"/></clipPath></defs><g clip-path="url(#clip-${uid})">`;
    uid += 1;
    for (const h of hl) {
      body += `<line class="hline" x1="${f.M.l}" x2="${f.M.l + f.iw}" y1="${a.Y(h.y).toFixed(1)}" y2="${a.Y(h.y).toFixed(1)}" stroke="${h.color || "#555"}"/>`;
      const ly = a.Y(h.y) - 4 < f.M.t + 10 ? a.Y(h.y) + 13 : a.Y(h.y) - 4;  // below the line at the top
      body += `<text class="hline-label" x="${f.M.l + f.iw - 4}" y="${ly.toFixed(1)}" text-anchor="end">${esc(h.label)}</text>`;
    }
    for (const s of series) {
      if (!s.points.length) continue;
      const d = s.points.map((p, i) => (i ? "L" : "M") + a.X(p[0]).toFixed(1) + "," + a.Y(p[1]).toFixed(1)).join("");
      if (s.area) {
        const base = a.Y(Math.max(ys[0], 0)).toFixed(1);
        body += `<path class="area" d="${d}L${a.X(s.points[s.points.length - 1][0]).toFixed(1)},${base}L${a.X(s.points[0][0]).toFixed(1)},${base}Z" fill="${s.color}"/>`;
      }
      body += `<path class="series" data-name="${esc(s.name)}" data-n="${s.points.length}" d="${d}" fill="none" stroke="${s.color}" stroke-width="${s.width || 1.8}"${s.dash ? ` stroke-dasharray="${s.dash}"` : ""}${s.opacity ? ` stroke-opacity="${s.opacity}"` : ""}/>`;
      if (s.points.length === 1) body += `<circle cx="${a.X(s.points[0][0]).toFixed(1)}" cy="${a.Y(s.points[0][1]).toFixed(1)}" r="3" fill="${s.color}"/>`;
    }
    body += `</g>`;
    for (const m of marks) {
      const x = a.X(m.x).toFixed(1);
      // a label that would run past the plot's right edge reads leftwards from its line
      const left = +x + 4 + textWidth(m.label) * 1.1 > f.M.l + f.iw;
      body += `<line class="mark" data-label="${esc(m.label)}" x1="${x}" x2="${x}" y1="${f.M.t}" y2="${f.M.t + f.ih}"/>`;
      body += `<text class="mark-label" x="${(left ? +x - 4 : +x + 4).toFixed(1)}" y="${f.M.t + 12}" text-anchor="${left ? "end" : "start"}">${esc(m.label)}</text>`;
    }
    body += `<line class="cross" x1="0" x2="0" y1="${f.M.t}" y2="${f.M.t + f.ih}" visibility="hidden"/><g class="dots"></g>`;
    body += `<rect class="hover" x="${f.M.l}" y="${f.M.t}" width="${f.iw}" height="${f.ih}" fill="transparent"/>`;
    // the legend names the series drawn: one with no point to draw is left out of it
    const drawn = series.filter(s => s.points.length);
    const legend = opt.legend !== undefined ? opt.legend : drawn.map(s => ({name: s.name, color: s.color, dash: s.dash, width: s.width, opacity: s.opacity}));
    const {svg, tip} = shell(el, {...opt, legend: series.length > 1 || opt.legend ? legend : []}, f, body);
    const cross = svg.querySelector(".cross"), dots = svg.querySelector(".dots"), hover = svg.querySelector(".hover");
    const xf = opt.x.fmt || num, yf = opt.y.fmt || num;
    function move(ev) {
      const r = svg.getBoundingClientRect();
      const px = (ev.clientX - r.left) * f.W / r.width, x = xs[0] + (px - f.M.l) / f.iw * (xs[1] - xs[0]);
      let html = "", dotsSvg = "", first = null;
      for (const s of series) {
        if (!s.points.length || s.hoverless) continue;
        const p = nearestByX(s.points, x);
        if (first === null) first = p;
        dotsSvg += `<circle cx="${a.X(p[0]).toFixed(1)}" cy="${a.Y(p[1]).toFixed(1)}" r="3.5" fill="${s.color}"/>`;
        html += `<div><span class="sw" data-color="${s.color}"></span>${esc(s.name)}: <b>${esc(withUnit(yf, p[1], opt.y))}</b>` +
          (series.length > 1 ? ` <small>at ${esc(withUnit(xf, p[0], opt.x))}</small>` : "") + `</div>`;
      }
      if (first === null) return;
      const cx = a.X(first[0]);
      cross.setAttribute("x1", cx.toFixed(1)); cross.setAttribute("x2", cx.toFixed(1)); cross.setAttribute("visibility", "visible");
      dots.innerHTML = dotsSvg;
      const head = `<div class="tip-x">${esc(opt.x.label)}: ${esc(withUnit(xf, first[0], opt.x))}</div>`;
      placeTip(tip, svg, cx * r.width / f.W, (ev.clientY - r.top), head + html);
      tip.querySelectorAll(".sw").forEach(sw => { sw.style.background = sw.dataset.color; });
    }
    hover.addEventListener("mousemove", move);
    hover.addEventListener("mouseleave", () => { tip.hidden = true; cross.setAttribute("visibility", "hidden"); dots.innerHTML = ""; });
  }

  /** Points not dominated by another: lower x (energy) and higher y (accuracy) are better. */
  function paretoFront(points) {
    const ok = points.filter(p => Number.isFinite(p.x) && Number.isFinite(p.y)).slice().sort((a, b) => a.x - b.x || b.y - a.y);
    const front = [];
    let best = -Infinity;
    for (const p of ok) if (p.y > best) { front.push(p); best = p.y; }
    return front;
  }

  /**
   * Scatter with the Pareto front (min x, max y) drawn as a step line.
   * opt: {title, x, y, points: [{x, y, label, color?}], note?}
   */
  function scatter(el, opt) {
    const f = frame(el, opt);
    const pts = opt.points.map((p, i) => ({...p, color: p.color || PALETTE[i % PALETTE.length]}));
    const ok = pts.filter(p => Number.isFinite(p.x) && Number.isFinite(p.y));
    if (!ok.length) {
      el.classList.add("chart");
      el.innerHTML = (opt.title ? `<div class="chart-title">${esc(opt.title)}</div>` : "") + `<div class="empty">${esc(opt.empty || "no data")}</div>`;
      return;
    }
    const xs = extent(ok.map(p => p.x), !!opt.x.zero), ys = extent(ok.map(p => p.y), !!opt.y.zero);
    const a = axes(f, xs, ys, opt);
    const front = paretoFront(ok);
    const onFront = new Set(front);
    let body = a.svg;
    if (front.length) {
      let d = `M${a.X(front[0].x).toFixed(1)},${a.Y(front[0].y).toFixed(1)}`;
      for (let i = 1; i < front.length; i++) d += `H${a.X(front[i].x).toFixed(1)}V${a.Y(front[i].y).toFixed(1)}`;
      d += `H${(f.M.l + f.iw).toFixed(1)}`;
      body += `<path class="front" d="${d}"/>`;
    }
    ok.forEach(p => {
      const cx = a.X(p.x).toFixed(1), cy = a.Y(p.y).toFixed(1);
      body += `<circle class="pt${onFront.has(p) ? " on-front" : ""}" data-i="${pts.indexOf(p)}" cx="${cx}" cy="${cy}" r="${onFront.has(p) ? 6.5 : 5}" fill="${p.color}"/>`;
      const right = +cx > f.M.l + f.iw * 0.7;  // labels near the right edge read leftwards
      body += `<text class="pt-label" x="${(right ? +cx - 8 : +cx + 8).toFixed(1)}" y="${(+cy - 8).toFixed(1)}" text-anchor="${right ? "end" : "start"}">${esc(p.short || p.label)}</text>`;
    });
    const legend = [{name: "Pareto front (less energy, higher accuracy)", color: "#333", dash: "5 3", width: 1.5}];
    const {svg, tip} = shell(el, {...opt, legend}, f, body);
    const xf = opt.x.fmt || num, yf = opt.y.fmt || num;
    svg.addEventListener("mousemove", ev => {
      const r = svg.getBoundingClientRect();
      const px = (ev.clientX - r.left) * f.W / r.width, py = (ev.clientY - r.top) * f.H / r.height;
      let best = null, bd = 400;
      for (const p of ok) { const d = (a.X(p.x) - px) ** 2 + (a.Y(p.y) - py) ** 2; if (d < bd) { bd = d; best = p; } }
      if (!best) { tip.hidden = true; return; }
      placeTip(tip, svg, a.X(best.x) * r.width / f.W, a.Y(best.y) * r.height / f.H,
        `<div class="tip-x">${esc(best.label)}</div><div>${esc(opt.x.label)}: <b>${esc(withUnit(xf, best.x, opt.x))}</b></div>` +
        `<div>${esc(opt.y.label)}: <b>${esc(withUnit(yf, best.y, opt.y))}</b></div>${onFront.has(best) ? "<div>on the Pareto front</div>" : "<div>dominated</div>"}`);
    });
    svg.addEventListener("mouseleave", () => { tip.hidden = true; });
  }

  let uid = 0;
  global.H3Charts = {line, scatter, paretoFront, ticks, timeTicks, duration, nearZero, num, qty, esc, PALETTE, DASHES};
})(typeof window !== "undefined" ? window : globalThis);
