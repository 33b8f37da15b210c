/* h3d dashboard: runs list, run page, compare view. Reads the public /v1 API with the bearer
 * token like any client. Hash routes name the view, so a URL can be shared:
 *   #/runs?status=&tag=&name=&sort=energy&dir=desc&page=1   #/run/<id>   #/compare/<id>,<id>,...
 * The token arrives in the fragment (#token=... , never sent to a server), is kept in this
 * tab's sessionStorage and removed from the address bar.
 * `h3d show RUN --html FILE` inlines this file with the run's data in <script id="h3d-data">:
 * the same code then draws the run page from that data, offline.
 */
"use strict";
(function () {
  const C = window.H3Charts, esc = C.esc, num = C.num, qty = C.qty;
  const EMBED = document.getElementById("h3d-data");
  const OFFLINE = EMBED ? JSON.parse(EMBED.textContent) : null;
  const TOKEN_KEY = "h3d-token";
  const POLL_MS = 2000;          // live run page refresh while the run is running
  const POLL_MAX_MS = 4000;      // the longest wait between retries while the daemon does not answer
  const PAGE = 50;               // rows per page of the runs list
  const STOP_FRACTION = 0.10;    // h3client's DIMINISHING_FRACTION: the suggested stopping point
  const POINTS = {loss: 1000, lossMean: 40, energy: 500, power: 600, compare: 100};
  const $ = sel => document.querySelector(sel);
  const main = () => $("#main");

  // ---------------------------------------------------------------- token, routing, API
  /** A fragment parameter as it was written, percent-decoded: not as a form's field
   *  (URLSearchParams), which reads "+" as a space, and a base64 token (openssl rand
   *  -base64) holds "+". A "%" that starts no escape is kept as it is. */
  function rawParam(query, key) {
    for (const part of query.split("&")) {
      const i = part.indexOf("=");
      if (i < 0 || part.slice(0, i) !== key) continue;
      try { return decodeURIComponent(part.slice(i + 1)); } catch (err) { return part.slice(i + 1); }
    }
    return null;
  }

  function takeTokenFromHash() {
    let h = location.hash.slice(1);
    let path = "", query = h;
    if (h.startsWith("/")) { const i = h.indexOf("?"); path = i < 0 ? h : h.slice(0, i); query = i < 0 ? "" : h.slice(i + 1); }
    const q = new URLSearchParams(query);
    const tok = rawParam(query, "token");
    if (!tok) return;
    sessionStorage.setItem(TOKEN_KEY, tok);
    q.delete("token");
    if (!path && q.get("run")) { path = "/run/" + q.get("run"); q.delete("run"); }  // the demo's old link form
    const rest = q.toString();
    history.replaceState(null, "", location.pathname + location.search + (path || rest ? "#" + (path || "/runs") + (rest ? "?" + rest : "") : ""));
  }

  function route() {
    const h = location.hash.slice(1) || "/runs";
    const i = h.indexOf("?");
    const path = (i < 0 ? h : h.slice(0, i)).split("/").filter(Boolean);
    return {view: path[0] || "runs", arg: path.slice(1).join("/"), q: new URLSearchParams(i < 0 ? "" : h.slice(i + 1))};
  }

  class Unauthorized extends Error {}
  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  async function authed(path, method = "GET") {
    let r;
    try {
      r = await fetch(path, {method, headers: {Authorization: "Bearer " + (sessionStorage.getItem(TOKEN_KEY) || "")}});
    } catch (err) {
      throw new Error("the daemon does not answer");  // fetch names no cause: refused, reset, offline
    }
    if (r.status === 401) throw new Unauthorized("unauthorized");
    return r;
  }

  async function api(path, method = "GET") {
    const r = await authed(path, method);
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) throw new ApiError(body && body.error ? body.error.message : `${r.status} ${r.statusText}`, r.status);
    return body;
  }

  // a file the API streams (the exports), saved through a link: the token stays in a header
  async function download(path, filename) {
    const r = await authed(path);
    if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
    const url = URL.createObjectURL(await r.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = filename;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  const REFUSED = "This daemon refused the token: paste the one in its own data dir.";

  function showLogin(note) {
    main().innerHTML = `<section class="login"><h2>Sign in to this daemon</h2>
      <p>Paste the bearer token from <code>&lt;data dir&gt;/token</code>. It stays in this tab's
      sessionStorage and is sent only to this daemon.</p>
      ${note ? `<p class="warn" id="login-note" role="alert">${esc(note)}</p>` : ""}
      <form id="login"><input id="tok" type="password" autocomplete="off" aria-label="token"> <button>Open</button></form></section>`;
    $("#login").addEventListener("submit", ev => {
      ev.preventDefault();
      signIn($("#tok").value.trim()).catch(showError);
    });
  }

  /** /healthz says whether the daemon takes a token without a 401, so a wrong one pasted
   *  here is refused before it is kept. */
  async function signIn(tok) {
    if (!tok) { showLogin("Paste a token first."); return; }
    let health = null;
    try {
      const r = await fetch("/healthz", {headers: {Authorization: "Bearer " + tok}});
      health = r.ok ? await r.json() : null;
    } catch (err) {
      throw new Error("the daemon does not answer");
    }
    if (!health || !health.authorized) { showLogin(REFUSED); return; }
    sessionStorage.setItem(TOKEN_KEY, tok);
    await render();
  }

  function showError(err) {
    if (err instanceof Unauthorized) {
      generation += 1;  // whatever was loading or polling stops
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(REFUSED);
      return;
    }
    const box = $("#error");
    box.textContent = err.message || String(err);
    box.hidden = false;
  }

  // ---------------------------------------------------------------- formatting helpers
  const when = s => s ? new Date(s * 1000).toLocaleString() : "–";
  const secs = s => s === null || s === undefined ? "–" : s < 120 ? qty(s, "s") : s < 7200 ? num(s / 60) + " min" : num(s / 3600) + " h";
  function badge(source, measured) {
    if (!source || source === "none") return `<span class="badge none" title="no power readable: energy unknown">no energy</span>`;
    return measured
      ? `<span class="badge measured" title="source: ${esc(source)}">measured</span>`
      : `<span class="badge estimated" title="source: ${esc(source)}: a model, not a measurement">estimated</span>`;
  }
  const statusBadge = s => `<span class="status ${esc(s)}">${esc(s)}</span>`;
  const duration = r => (r.finished_at || (r.status === "running" ? Date.now() / 1000 : r.last_t || r.created_at)) - r.created_at;

  /** Cumulative energy at time t from the daemon's cumulative series: linear between two of
   *  its points, null (unknown) outside them. No energy is made up before its first point
   *  (the daemon starts it where a device had read some: earlier batches have none) or held
   *  past its last. */
  function energyAt(epts, t) {
    if (!epts.length || !(t >= epts[0][0]) || !(t <= epts[epts.length - 1][0])) return null;
    let lo = 0, hi = epts.length - 1;
    while (hi - lo > 1) { const m = (lo + hi) >> 1; if (epts[m][0] <= t) lo = m; else hi = m; }
    const [ta, ea] = epts[lo], [tb, eb] = epts[hi];
    return tb > ta ? ea + (eb - ea) * (t - ta) / (tb - ta) : eb;
  }

  /** Loss points [t, loss] placed on the energy axis: only those the energy series spans. */
  function onEnergy(epts, pts) {
    const out = [];
    for (const p of pts) { const e = energyAt(epts, p[0]); if (e !== null) out.push([e, p[1]]); }
    return out;
  }

  /** The suggested stopping point: the last epoch after which η stayed < 10 % of its peak
   *  (the rule of h3client's report; null when η never fell that far or < 3 epochs). */
  function stoppingPoint(epochs) {
    const etas = epochs.map(e => e.eta_bits_per_j);
    const known = etas.filter(v => v !== null && v !== undefined);
    if (epochs.length < 3 || !known.length) return null;
    const peak = Math.max(...known);
    if (!(peak > 0)) return null;
    // the last epoch whose η is known and ≥ 10 % of the peak; an epoch without η (an epoch
    // logged with no batches, no energy read in it) says nothing either way: it neither
    // withdraws a stop the known η's made nor makes one they did not
    let stop = null, fellAfter = false;
    for (let i = epochs.length - 1; i >= 0; i--) {
      const v = etas[i];
      if (v === null || v === undefined) continue;
      if (v >= STOP_FRACTION * peak) { stop = i; break; }
      fellAfter = true;
    }
    if (stop === null || !fellAfter) return null;
    const energy = es => es.reduce((a, e) => a + (e.energy_j || 0), 0);
    const after = energy(epochs.slice(stop + 1)), total = energy(epochs);
    return {epoch: epochs[stop].epoch, t_end: epochs[stop].t_end, peak, energy_after_j: after, energy_after_frac: total > 0 ? after / total : null};
  }

  /** Why stoppingPoint found none, in words for the summary card. */
  function noStopReason(epochs, energyJ) {
    const known = epochs.filter(e => e.eta_bits_per_j !== null && e.eta_bits_per_j !== undefined);
    if (energyJ === null || energyJ === undefined) return "no η: no energy";
    if (!epochs.length) return "needs η for at least 3 epochs: none logged";
    if (epochs.length < 3) return `needs η for at least 3 epochs (${epochs.length} logged)`;
    if (!known.length) return "no epoch has an η";
    if (!(Math.max(...known.map(e => e.eta_bits_per_j)) > 0)) return "η never rose above 0";
    return "η has not fallen below 10 % of its peak";
  }

  /** Why the η chart has nothing to draw: no epoch has an η (nor η since the start). */
  function noEtaReason(epochs, energyJ) {
    const none = v => v === null || v === undefined;
    if (!epochs.length) return "no epochs logged (log_epoch)";
    if (none(energyJ)) return "no epoch has an η: no energy (no device was readable)";
    if (epochs.every(e => none(e.info_gain_bits))) return "no epoch has an η: ΔI needs a smoothed loss at an epoch's start and end (at least 2 batches)";
    if (epochs.every(e => none(e.energy_j) || !(e.energy_j > 0))) return "no epoch has an η: no energy was measured within an epoch";
    return "no epoch has an η";
  }

  /** η since the start at each epoch's end (ΔI telescopes: Σ bits / Σ joules). Gains that
   *  cancel (+0.1 + 0.2 − 0.3 bits) sum to float noise: that is 0 bits, so η 0. */
  function cumulativeEta(epochs) {
    let bits = 0, size = 0, joules = 0, ok = true;
    return epochs.map(e => {
      if (e.info_gain_bits === null || e.energy_j === null) ok = false;
      bits += e.info_gain_bits || 0; size += Math.abs(e.info_gain_bits || 0); joules += e.energy_j || 0;
      return ok && joules > 0 ? C.nearZero(bits, size) / joules : null;
    });
  }

  /** An η or ΔI for people: exactly 0 when it is float noise about 0 (|v| ≤ 1e-12 of the
   *  loss it came from, ~1 nat: the daemon's smoothed losses are exact for equal losses, but
   *  a figure summed elsewhere may not be), never "−7.5e-17". */
  const ZERO_BITS = 1e-12;
  function bitsNum(bits) { return num(C.nearZero(bits, 1)); }
  function etaNum(eta, bits) {
    if (eta === null || eta === undefined) return num(eta);
    return bits !== null && bits !== undefined && Math.abs(bits) <= ZERO_BITS ? "0" : num(eta);
  }

  // ---------------------------------------------------------------- runs list
  // Only finished (or failed) runs' summaries are kept between visits: they no longer change.
  const list = {summaries: new Map(), selected: new Set()};

  /** Every matching run, read from the daemon on every visit to the list (statuses change and
   *  new runs appear while the page is open). */
  async function loadMeta(q) {
    const params = new URLSearchParams({limit: "1000"});
    for (const k of ["status", "tag", "name"]) if (q.get(k)) params.set(k, q.get(k));
    let out = [], cursor = null;
    do {
      const page = await api("/v1/runs?" + params.toString() + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
      out = out.concat(page.data);
      cursor = page.next_cursor;
    } while (cursor);
    for (const r of out) {  // a run that finished since its summary was read is read again
      const s = list.summaries.get(r.id);
      if (s && s.status !== r.status) list.summaries.delete(r.id);
    }
    return out;
  }

  /** Energy, η and accuracy come from /v1/compare (20 runs a call); finished runs are cached. */
  async function loadSummaries(ids, progress) {
    const need = ids.filter(id => { const s = list.summaries.get(id); return !s || s.status === "running"; });
    const chunks = [];
    for (let i = 0; i < need.length; i += 20) chunks.push(need.slice(i, i + 20));
    let done = 0;
    async function worker() {
      while (chunks.length) {
        const chunk = chunks.shift();
        const res = await api("/v1/compare?runs=" + chunk.join(","));
        for (const row of res.runs) list.summaries.set(row.run_id, row);
        done += chunk.length;
        if (progress) progress(done, need.length);
      }
    }
    await Promise.all([worker(), worker()]);
  }

  const COLUMNS = [
    {key: "start", label: "start", num: true, get: r => r.created_at},
    {key: "name", label: "name", get: r => r.name.toLowerCase()},
    {key: "status", label: "status", get: r => r.status},
    {key: "duration", label: "duration", num: true, get: r => duration(r)},
    {key: "energy", label: "energy", num: true, summary: true, get: (r, s) => s ? s.energy_j : undefined},
    {key: "eta", label: "η (bits/J)", num: true, summary: true, get: (r, s) => s ? s.eta_bits_per_j : undefined},
    {key: "accuracy", label: "final accuracy", num: true, summary: true, get: (r, s) => s ? s.final_accuracy : undefined},
    {key: "tags", label: "tags", get: r => r.tags.join(",").toLowerCase()},
  ];

  function hashWith(q, changes) {
    const n = new URLSearchParams(q);
    for (const [k, v] of Object.entries(changes)) { if (v === null || v === "" || v === undefined) n.delete(k); else n.set(k, String(v)); }
    const s = n.toString();
    return "#/runs" + (s ? "?" + s : "");
  }

  async function viewRuns(q, gen) {
    const sort = q.get("sort") || "start", dir = q.get("dir") || (sort === "name" || sort === "tags" ? "asc" : "desc");
    const col = COLUMNS.find(c => c.key === sort) || COLUMNS[0];
    main().innerHTML = `<section class="runs">
      <form class="filters" id="filters">
        <label>status <select name="status"><option value="">any</option><option>running</option><option>finished</option><option>failed</option></select></label>
        <label>tag <input name="tag" placeholder="exact tag" size="14"></label>
        <label>name <input name="name" placeholder="contains" size="16"></label>
        <button>Filter</button> <button type="button" id="clear">Clear</button>
        <span class="spacer"></span>
        <button type="button" id="refresh" title="reload the list">Refresh</button>
        <button type="button" id="compare" disabled>Compare selected</button>
      </form>
      <div class="list-status" id="list-status">loading…</div>
      <div id="table"></div><div class="pager" id="pager"></div></section>`;
    const form = $("#filters");
    for (const k of ["status", "tag", "name"]) form.elements[k].value = q.get(k) || "";
    form.addEventListener("submit", ev => {
      ev.preventDefault();
      location.hash = hashWith(q, {status: form.elements.status.value, tag: form.elements.tag.value.trim(), name: form.elements.name.value.trim(), page: null});
    });
    $("#clear").addEventListener("click", () => { location.hash = hashWith(q, {status: null, tag: null, name: null, page: null}); });
    $("#refresh").addEventListener("click", () => { render().catch(showError); });
    $("#compare").addEventListener("click", () => { location.hash = "#/compare/" + [...list.selected].join(","); });
    const meta = await loadMeta(q);
    if (gen !== generation) return;
    const statusLine = $("#list-status");
    if (col.summary) {
      await loadSummaries(meta.map(r => r.id), (d, n) => { if (gen === generation) statusLine.textContent = `computing energy, η and accuracy: ${d} of ${n} runs…`; });
      if (gen !== generation) return;
    }
    const rows = meta.slice();
    const val = r => col.get(r, list.summaries.get(r.id));
    rows.sort((a, b) => {
      const va = val(a), vb = val(b);
      const na = va === null || va === undefined, nb = vb === null || vb === undefined;
      if (na || nb) return na === nb ? 0 : na ? 1 : -1;  // unknown values last, either direction
      const c = va < vb ? -1 : va > vb ? 1 : 0;
      return dir === "asc" ? c : -c;
    });
    const pages = Math.max(1, Math.ceil(rows.length / PAGE));
    const page = Math.min(pages, Math.max(1, parseInt(q.get("page") || "1", 10) || 1));
    const shown = rows.slice((page - 1) * PAGE, page * PAGE);
    await loadSummaries(shown.map(r => r.id));
    if (gen !== generation) return;
    const filt = ["status", "tag", "name"].filter(k => q.get(k)).map(k => `${k} ${q.get(k)}`).join(", ");
    statusLine.textContent = `${rows.length} run${rows.length === 1 ? "" : "s"}${filt ? " matching " + filt : ""} · sorted by ${col.label} ${dir === "asc" ? "ascending" : "descending"} · select 2 to 6 runs to compare`;
    const head = `<tr><th class="sel"><span class="sr">select</span></th>` + COLUMNS.map(c => {
      const active = c.key === sort;
      const next = active ? (dir === "asc" ? "desc" : "asc") : (c.num ? "desc" : "asc");
      return `<th${c.num ? ' class="num"' : ""} aria-sort="${active ? (dir === "asc" ? "ascending" : "descending") : "none"}"><a class="sort${active ? " active " + dir : ""}" data-sort="${c.key}" href="${esc(hashWith(q, {sort: c.key, dir: next, page: null}))}">${esc(c.label)}</a></th>`;
    }).join("") + `</tr>`;
    const body = shown.map(r => {
      const s = list.summaries.get(r.id);
      const tags = r.tags.map(t => `<a class="tag" href="${esc(hashWith(q, {tag: t, page: null}))}">${esc(t)}</a>`).join(" ");
      return `<tr data-id="${esc(r.id)}"><td class="sel"><input type="checkbox" aria-label="select ${esc(r.name)}" data-id="${esc(r.id)}"${list.selected.has(r.id) ? " checked" : ""}></td>
        <td class="num" data-col="start">${esc(when(r.created_at))}</td>
        <td data-col="name"><a href="#/run/${esc(r.id)}">${esc(r.name)}</a></td>
        <td data-col="status">${statusBadge(r.status)}</td>
        <td class="num" data-col="duration">${esc(secs(duration(r)))}</td>
        <td class="num" data-col="energy" data-value="${s && s.energy_j !== null ? s.energy_j : ""}">${s ? esc(qty(s.energy_j, "J")) + " " + badge(s.source, s.measured) : "…"}</td>
        <td class="num" data-col="eta">${s ? esc(etaNum(s.eta_bits_per_j, s.info_gain_bits)) : "…"}</td>
        <td class="num" data-col="accuracy">${s ? esc(num(s.final_accuracy, 4)) : "…"}</td>
        <td data-col="tags">${tags}</td></tr>`;
    }).join("");
    $("#table").innerHTML = rows.length ? `<div class="scroll-x"><table class="runs-table"><thead>${head}</thead><tbody>${body}</tbody></table></div>` : `<p class="empty">No runs${filt ? " match " + esc(filt) : " yet: profile a training loop with h3client.H3Profiler"}.</p>`;
    $("#pager").innerHTML = pages > 1
      ? `<a class="prev${page <= 1 ? " off" : ""}" href="${esc(hashWith(q, {page: Math.max(1, page - 1)}))}">‹ newer</a> page ${page} of ${pages} <a class="next${page >= pages ? " off" : ""}" href="${esc(hashWith(q, {page: Math.min(pages, page + 1)}))}">older ›</a>`
      : "";
    const updateCompare = () => {
      const n = list.selected.size, btn = $("#compare");
      btn.disabled = n < 2 || n > 6;
      btn.textContent = n ? `Compare ${n} selected` : "Compare selected";
    };
    $("#table").addEventListener("change", ev => {
      const id = ev.target.dataset && ev.target.dataset.id;
      if (!id) return;
      if (ev.target.checked) list.selected.add(id); else list.selected.delete(id);
      updateCompare();
    });
    updateCompare();
  }

  // ---------------------------------------------------------------- run page
  /** Everything the run page draws, in one object: fetched from /v1, or embedded (offline). */
  async function loadRunBundle(id) {
    if (OFFLINE) return OFFLINE.bundle;
    const base = "/v1/runs/" + encodeURIComponent(id);
    const [run, report, loss, lossMean, energy, devices] = await Promise.all([
      api(base), api(base + "/report"), api(`${base}/series?metric=loss&points=${POINTS.loss}`),
      api(`${base}/series?metric=loss&agg=mean&points=${POINTS.lossMean}`),
      api(`${base}/series?metric=energy&points=${POINTS.energy}`), api("/v1/devices"),
    ]);
    // one series per row of by_device, in its order: a device is its node and its name
    // together (every node of a cluster has its own nvml:0)
    const power = await Promise.all(report.energy.by_device.map(async d =>
      (await api(`${base}/series?metric=power&node=${encodeURIComponent(d.node)}&device=${encodeURIComponent(d.device)}&points=${POINTS.power}`)).points));
    return {run, report, loss: loss.points, loss_mean: {points: lossMean.points, bucket_batches: lossMean.bucket_batches}, energy: energy.points, power, devices: devices.devices};
  }

  // The carbon card's line. Grams known: their source, the detail on hover. Unknown: why,
  // as the daemon says it: an intensity but no energy to weigh, nothing configured, or a
  // configured source that failed (carbon_detail names each failure).
  function carbonNote(e) {
    const source = e.carbon_source || "none";
    const info = e.carbon_detail ? ` <span title="${esc(e.carbon_detail)}">ⓘ</span>` : "";
    if (e.co2e_g !== null && e.co2e_g !== undefined) return esc(source) + info;
    if (source !== "none") return `${esc(source)}: energy unknown${info}`;
    return esc(e.carbon_detail || "no grid intensity configured");
  }

  function summaryCards(b, stop) {
    const rep = b.report, e = rep.energy, eta = rep.eta;
    const acc = [...rep.epochs].reverse().find(x => x.accuracy !== null && x.accuracy !== undefined);
    const card = (label, value, sub) => `<div class="card"><div class="card-label">${label}</div><div class="card-value">${value}</div>${sub ? `<div class="card-sub">${sub}</div>` : ""}</div>`;
    return `<div class="cards">
      ${card("duration", esc(secs(rep.duration_s)), `${rep.n_batches} batch${rep.n_batches === 1 ? "" : "es"}${rep.n_nonfinite ? `, ${rep.n_nonfinite} non-finite` : ""}`)}
      ${card("energy", esc(qty(e.energy_j, "J")), badge(e.source, e.measured) + (e.active_energy_j !== null && e.active_energy_j !== undefined ? ` ${esc(qty(e.active_energy_j, "J"))} above idle` : e.energy_j !== null ? ` <span title="${esc(e.active_energy_note || "no idle baseline")}">above idle unknown</span>` : ""))}
      ${card("loss", `${esc(num(eta.loss_start))} → ${esc(num(eta.loss_now))}`, "nats, smoothed")}
      ${card("information gained ΔI", esc(bitsNum(eta.info_gain_bits)) + " bits/sample", eta.info_gain_total_bits !== null ? esc(etaNum(eta.info_gain_total_bits, eta.info_gain_bits)) + " bits about the training set" : "")}
      ${card("η", esc(etaNum(eta.eta_bits_per_j, eta.info_gain_bits)) + " bits/J", "since the start")}
      ${card("marginal η", esc(num(eta.marginal_eta_bits_per_j)) + " bits/J", eta.window_is_whole_run ? `whole run (shorter than the ${esc(qty(eta.window_s, "s"))} window)` : `last ${esc(qty(eta.window_s, "s"))}`)}
      ${card("carbon", e.co2e_g === null || e.co2e_g === undefined ? "–" : esc(qty(e.co2e_g, "g")) + " CO₂e", carbonNote(e))}
      ${card("final accuracy", acc ? esc(num(acc.accuracy, 4)) : "–", acc ? `epoch ${acc.epoch}` : "no accuracy logged")}
      ${card("suggested stop", stop ? `after epoch ${stop.epoch}` : "–", stop ? `η fell below 10 % of its peak; ${esc(qty(stop.energy_after_j, "J"))} (${esc(num(100 * (stop.energy_after_frac || 0)))} %) spent after` : esc(noStopReason(rep.epochs, e.energy_j)))}
    </div>`;
  }

  function provenance(b) {
    // /v1/devices lists the answering daemon's node only: a device is its node and its name
    const key = (node, name) => JSON.stringify([node, name]);
    const e = b.report.energy, live = new Map((b.devices || []).map(d => [key(d.node, d.name), d]));
    const here = new Set((b.devices || []).map(d => d.node));
    const manyNodes = new Set(e.by_device.map(d => d.node)).size > 1;
    if (!e.by_device.length) return `<p>No device was readable over this run: its energy is unknown (source <code>none</code>), and η with it.</p>`;
    const rows = e.by_device.map(d => {
      const dv = live.get(key(d.node, d.device));
      return `<tr><td>${esc(d.device)}${manyNodes ? ` <small>on ${esc(d.node)}</small>` : ""}<br><small>${esc(d.model || d.kind)}</small>${d.caveat ? `<small class="note">${esc(d.caveat)}</small>` : ""}</td><td>${esc(d.source)} ${badge(d.source, d.source !== "estimated")}</td>
        <td>${esc(d.method)}</td><td class="num">${esc(qty(d.granularity_s, "s"))}${d.below_granularity ? ' <span class="warn" title="the window is shorter than the update period">below</span>' : ""}</td>
        <td class="num">${d.n_samples}</td><td class="num">${esc(qty(d.covered_s, "s"))}</td><td class="num${d.gaps_s > 0 ? " warn" : ""}">${esc(qty(d.gaps_s, "s"))}</td>
        <td>${esc(d.attribution === "process" ? "process share" : "whole device")}</td><td class="num">${esc(num(100 * d.share))} %</td>
        <td class="num">${esc(qty(d.idle_power_w, "W"))}${d.idle_note ? `<br><small class="note">${esc(d.idle_note)}</small>` : ""}</td>
        <td class="num">${esc(qty(d.energy_j, "J"))}</td><td class="num">${esc(qty(d.device_energy_j, "J"))}</td>
        <td>${dv ? esc(dv.status) + (dv.reason && dv.status !== "ok" ? `<br><small>${esc(dv.reason)}</small>` : "") : here.size && !here.has(d.node) ? `–<br><small class="note">on node ${esc(d.node)}: its own daemon knows</small>` : "–"}</td></tr>`;
    }).join("");
    return `<p>Energy ${e.measured ? "is <b>measured</b>" : "is <b>not</b> (only) measured: part of it is an estimate"} (source <code>${esc(e.source)}</code>).
      Whole devices used ${esc(qty(e.device_energy_j, "J"))} over the run's window; the run's attributed share is ${esc(qty(e.energy_j, "J"))}.</p>
      <div class="scroll-x"><table class="prov"><thead><tr><th>device</th><th>source</th><th>method</th><th class="num">granularity</th><th class="num">samples</th><th class="num">covered</th><th class="num">gaps</th><th>attribution</th><th class="num">share</th><th class="num">idle baseline</th><th class="num">run's energy</th><th class="num">whole device</th><th>device state</th></tr></thead><tbody>${rows}</tbody></table></div>`;
  }

  function epochsTable(rep, cum, stop) {
    if (!rep.epochs.length) return `<p>No epochs logged (<code>log_epoch</code>).</p>`;
    const metricKeys = [...new Set(rep.epochs.flatMap(e => Object.keys(e.metrics || {})))].slice(0, 6);
    return `<div class="scroll-x"><table class="epochs"><thead><tr><th>epoch</th><th>phase</th><th class="num">loss (nats)</th><th class="num">val loss</th><th class="num">accuracy</th><th class="num">energy</th><th class="num">ΔI (bits/sample)</th><th class="num">marginal η (bits/J)</th><th class="num">η since start (bits/J)</th>${metricKeys.map(k => `<th class="num">${esc(k)}</th>`).join("")}</tr></thead><tbody>` +
      rep.epochs.map((e, i) => `<tr${stop && stop.epoch === e.epoch ? ' class="stop"' : ""}><td>${e.epoch}${stop && stop.epoch === e.epoch ? ' <span class="stop-tag">suggested stop</span>' : ""}</td><td>${esc(e.phase || "–")}</td><td class="num">${esc(num(e.loss, 4))}</td><td class="num">${esc(num(e.val_loss, 4))}</td><td class="num">${esc(num(e.accuracy, 4))}</td>
        <td class="num">${esc(qty(e.energy_j, "J"))}</td><td class="num">${esc(bitsNum(e.info_gain_bits))}</td><td class="num">${esc(etaNum(e.eta_bits_per_j, e.info_gain_bits))}</td><td class="num">${esc(num(cum[i]))}</td>${metricKeys.map(k => `<td class="num">${esc(num((e.metrics || {})[k], 4))}</td>`).join("")}</tr>`).join("") + `</tbody></table></div>` +
      (rep.epochs.some(e => e.eta_bits_per_j < 0 && e.eta_bits_per_j !== null) ? `<p class="hint">A negative η means the smoothed training loss rose over that epoch: the model lost information about its training data there.</p>` : "");
  }

  /** Why a run has no loss-against-energy curve: no energy at all, or too few batches (the
   *  daemon's cumulative energy series needs 2) while the run's energy is known. */
  const noEnergyCurve = energyJ => energyJ === null || energyJ === undefined
    ? "no energy: no device was readable" : "too few batches to place on the energy axis";

  function drawRun(b) {
    const rep = b.report, t0 = b.run.created_at;
    const stop = stoppingPoint(rep.epochs);
    const cum = cumulativeEta(rep.epochs);
    $("#run-cards").innerHTML = summaryCards(b, stop);
    const stopMarkT = stop ? [{x: stop.t_end - t0, label: `stop: epoch ${stop.epoch}`}] : [];
    // The loss's level is the daemon's bucket means (agg=mean: every batch, weighted by n),
    // not a rolling mean of the LTTB points, which keep each bucket's extremes.
    const mean = b.loss_mean || {points: [], bucket_batches: null};
    const kb = mean.bucket_batches || 1;
    const lossSeries = (pts, meanPts) => [
      {name: "batch loss", points: pts, color: C.PALETTE[5], dash: "", width: 1, opacity: 0.55},
      ...(kb > 1 ? [{name: `mean of ${kb} batches`, points: meanPts, color: C.PALETTE[0], dash: "", width: 2.2}] : []),
    ];
    C.line($("#chart-loss-time"), {
      title: "Loss against time", x: {label: "time since start", unit: "s", time: true}, y: {label: "loss", unit: "nats"},
      series: lossSeries(b.loss.map(p => [p[0] - t0, p[1]]), mean.points.map(p => [p[0] - t0, p[1]])), marks: stopMarkT,
      empty: rep.n_batches ? `no finite loss among the ${rep.n_batches} batches` : b.run.status === "running" ? "no batches logged yet" : "no batches logged",
    });
    // Only what the daemon measured: a loss point goes on the energy axis where the run's
    // cumulative energy series spans its time; before its first point (no device had read
    // any of the run yet) or past its last, the energy is unknown and the point left out.
    const hasEnergy = b.energy.length > 0;
    const lossE = hasEnergy ? onEnergy(b.energy, b.loss) : [];
    const meanE = hasEnergy ? onEnergy(b.energy, mean.points) : [];
    const leftOut = hasEnergy ? b.loss.length - lossE.length : 0;
    const stopE = stop && hasEnergy ? energyAt(b.energy, stop.t_end) : null;
    C.line($("#chart-loss-energy"), {
      title: "Loss against cumulative energy: what each joule bought", x: {label: "energy used by the run", unit: "J"}, y: {label: "loss", unit: "nats"},
      series: hasEnergy ? lossSeries(lossE, meanE) : [],
      marks: stopE !== null ? [{x: stopE, label: `stop: epoch ${stop.epoch}`}] : [],
      empty: hasEnergy ? "no batch falls where the run's energy was measured" : noEnergyCurve(rep.energy.energy_j),
      warn: rep.energy.measured || !hasEnergy ? "" : "energy is an estimate, not a measurement",
      note: leftOut ? `${leftOut} of ${b.loss.length} loss points left out: no energy was measured up to their time (energy unknown, not drawn)` : "",
    });
    const powerBox = $("#power-charts");
    powerBox.innerHTML = rep.energy.by_device.map((d, i) => `<div class="chart-cell" id="chart-power-${i}"></div>`).join("") || `<div class="chart"><div class="chart-title">Power per device</div><div class="empty">no device was readable over this run</div></div>`;
    const manyNodes = new Set(rep.energy.by_device.map(d => d.node)).size > 1;
    rep.energy.by_device.forEach((d, i) => {
      const dev = manyNodes ? `${d.device} on ${d.node}` : d.device;
      const pts = (b.power[i] || []).map(p => [p[0] - t0, p[1]]);
      const series = [{name: `${dev} power`, points: pts, color: C.PALETTE[0], dash: ""}];
      if (d.share < 0.999) series.push({name: `run's share (${num(100 * d.share)} % on average)`, points: pts.map(p => [p[0], p[1] * d.share]), color: C.PALETTE[2], dash: "", area: true, width: 1.2});
      C.line($("#chart-power-" + i), {
        title: `Power per device: ${dev}${d.source === "estimated" ? " (estimated)" : ""}`, x: {label: "time since start", unit: "s", time: true}, y: {label: "power", unit: "W", zero: true},
        series, marks: stopMarkT, legend: [...series.map(s => ({name: s.name, color: s.color})), ...(d.idle_power_w !== null ? [{name: `idle baseline ${qty(d.idle_power_w, "W")}`, color: "#555", dash: "4 3"}] : [])],
        hlines: d.idle_power_w !== null ? [{y: d.idle_power_w, label: `idle ${qty(d.idle_power_w, "W")}`}] : [],
      });
    });
    const ep = rep.epochs;
    C.line($("#chart-eta"), {
      title: "η and marginal η per epoch", x: {label: "epoch", unit: "", fmt: v => Number.isInteger(v) ? String(v) : ""}, y: {label: "η", unit: "bits/J"},
      series: [
        {name: "η since start", points: ep.map((e, i) => [e.epoch, cum[i]]).filter(p => p[1] !== null)},
        {name: "marginal η (the epoch's own)", points: ep.filter(e => e.eta_bits_per_j !== null).map(e => [e.epoch, Number(etaNum(e.eta_bits_per_j, e.info_gain_bits)) === 0 ? 0 : e.eta_bits_per_j])},
      ],
      marks: stop ? [{x: stop.epoch, label: "suggested stop"}] : [], empty: noEtaReason(ep, rep.energy.energy_j),
    });
    $("#epochs").innerHTML = epochsTable(rep, cum, stop);
    $("#provenance").innerHTML = provenance(b);
  }

  /** DELETE the run, once the person confirmed; then the runs list. A running run has no
   *  button (the daemon answers 409 run_running). */
  async function deleteRun(r) {
    if (!window.confirm(`Delete the run "${r.name}" (${r.id}) and all its data? This cannot be undone.`)) return;
    await api("/v1/runs/" + encodeURIComponent(r.id), "DELETE");
    location.hash = "#/runs";
  }

  async function viewRun(id, gen) {
    main().innerHTML = `<section class="run" id="run">
      <div class="run-head" id="run-head">loading…</div>
      <div id="run-cards"></div>
      <div class="charts">
        <div class="chart-cell" id="chart-loss-time"></div><div class="chart-cell" id="chart-loss-energy"></div>
        <div class="chart-cell" id="chart-eta"></div><div class="power-charts" id="power-charts"></div>
      </div>
      <h3>Epochs</h3><div id="epochs"></div>
      <h3>Provenance</h3><div id="provenance"></div>
      <div class="two"><div><h3>Config</h3><pre id="config"></pre></div><div><h3>Tags</h3><div id="tags"></div></div></div>
    </section>`;
    let polls = 0, failures = 0, updated = null;
    /** Fetch and draw the run; true while it runs (worth another poll). */
    async function refresh() {
      const b = await loadRunBundle(id);
      if (gen !== generation) return false;
      updated = new Date();
      const r = b.run, running = r.status === "running" && !OFFLINE;
      document.title = `${r.name} — h3d`;
      $("#run-head").innerHTML = `<h2>${esc(r.name)} ${statusBadge(r.status)}</h2>
        <div class="sub"><code>${esc(r.id)}</code> · started ${esc(when(r.created_at))}${r.finished_at ? " · ended " + esc(when(r.finished_at)) : ""}${r.host ? " · host " + esc(r.host) : ""}
        ${OFFLINE ? ` · report written ${esc(when(OFFLINE.generated_at))}` : ` · <span class="live" id="live" data-state="${running ? "live" : "stopped"}" data-polls="${polls}">${running ? `live: updates every ${POLL_MS / 1000} s` : "not running: no live updates"}</span>`}</div>
        ${OFFLINE ? "" : `<div class="downloads">download as CSV: <button type="button" id="dl-batches">batches</button> <button type="button" id="dl-samples">per-sample losses</button>${running ? "" : ` · <button type="button" id="del-run" class="danger" title="delete this run and all its data from the store">delete run</button>`}</div>`}`;
      if (!OFFLINE) {
        const base = "/v1/runs/" + encodeURIComponent(r.id);
        $("#dl-batches").addEventListener("click", () => download(base + "/export.csv", `${r.id}.csv`).catch(showError));
        $("#dl-samples").addEventListener("click", () => download(base + "/samples.csv", `${r.id}-samples.csv`).catch(showError));
        if (!running) $("#del-run").addEventListener("click", () => deleteRun(r).catch(showError));
      }
      drawRun(b);
      $("#config").textContent = JSON.stringify(r.config, null, 2);
      $("#tags").innerHTML = r.tags.length ? r.tags.map(t => OFFLINE ? `<span class="tag">${esc(t)}</span>` : `<a class="tag" href="#/runs?tag=${encodeURIComponent(t)}">${esc(t)}</a>`).join(" ") : "none";
      return running;
    }
    function setLive(state, text) {
      const live = $("#live");
      live.dataset.state = state;
      live.dataset.polls = String(polls);
      live.textContent = text;
    }
    // A failed poll keeps the last figures on screen and says so in the header: the page
    // retries (after POLL_MS, then every POLL_MAX_MS) until the daemon answers again,
    // and stops for good only when the run is gone or the token is refused.
    async function poll() {
      if (gen !== generation) return;
      polls += 1;
      let next = null;
      try {
        next = await refresh() ? POLL_MS : null;
        failures = 0;
      } catch (err) {
        if (gen !== generation) return;
        if (err instanceof Unauthorized) { showError(err); return; }
        const at = updated.toLocaleTimeString();
        if (err instanceof ApiError && err.status === 404) {
          setLive("gone", `updates stopped at ${at}: the daemon no longer has this run`);
          return;
        }
        failures += 1;
        next = Math.min(POLL_MAX_MS, POLL_MS * 2 ** (failures - 1));
        setLive("retrying", `no update since ${at}: ${err.message || err}; retrying in ${next / 1000} s`);
      }
      if (next !== null && gen === generation) setTimeout(poll, next);
    }
    let first;
    try {
      first = await refresh();
    } catch (err) {
      // an id this store does not hold (a stale link, a run deleted, a typo): the API's 404
      // says so, and the page says it instead of "loading…" for good
      if (!(err instanceof ApiError && err.status === 404) || gen !== generation) throw err;
      document.title = "run not found — h3d";
      main().innerHTML = `<section class="run" id="run"><h2>Run not found</h2>
        <p class="warn" id="run-missing" role="alert">No run with id <code>${esc(id)}</code> in this daemon's store (deleted, or never stored here): ${esc(err.message)}</p>
        <p><a href="#/runs">Back to the runs list</a></p></section>`;
      return;
    }
    if (first) setTimeout(poll, POLL_MS);
  }

  // ---------------------------------------------------------------- compare
  async function viewCompare(arg, gen) {
    const unique = [...new Set(arg.split(",").map(s => s.trim()).filter(Boolean))];
    const asked = unique.slice(0, 6), dropped = unique.slice(6);
    const needs = `Compare needs 2 to 6 runs: select them in the <a href="#/runs">runs list</a>.`;
    if (asked.length < 2) {
      main().innerHTML = `<p class="empty">${needs}</p>`;
      return;
    }
    main().innerHTML = `<section class="compare"><h2>Compare ${asked.length} runs</h2>${dropped.length ? `<p class="warn">Only the first 6 runs are compared; left out: ${dropped.map(esc).join(", ")}</p>` : ""}
      <div id="cmp-missing"></div>
      <div class="cmp-top"><div id="cmp-table">loading…</div><div class="chart-cell" id="cmp-scatter"></div></div>
      <div class="charts"><div class="chart-cell" id="cmp-loss-energy"></div><div class="chart-cell" id="cmp-loss-time"></div></div></section>`;
    // A run deleted since the link was made (or an id this store never held) is named, and
    // the others are compared without it: one 404 must not leave the whole view loading.
    const found = await Promise.all(asked.map(id => api("/v1/runs/" + encodeURIComponent(id)).catch(err => {
      if (err instanceof ApiError && err.status === 404) return null;
      throw err;
    })));
    if (gen !== generation) return;
    const ids = asked.filter((id, i) => found[i] !== null), runs = found.filter(r => r !== null);
    const gone = asked.filter((id, i) => found[i] === null);
    if (gone.length) {
      const what = `${gone.length === 1 ? "No run with id" : "No runs with ids"} ${gone.map(id => `<code>${esc(id)}</code>`).join(", ")} in this daemon's store (deleted, or never stored here)`;
      if (ids.length < 2) {
        const left = runs.map(r => `<a href="#/run/${esc(encodeURIComponent(r.id))}">${esc(r.name)}</a>`).join(", ");
        main().innerHTML = `<p class="warn" id="cmp-missing">${what}.${left ? ` Still here: ${left}.` : ""}</p><p class="empty">${needs}</p>`;
        return;
      }
      $("#main h2").textContent = `Compare ${ids.length} runs`;
      $("#cmp-missing").innerHTML = `<p class="warn">${what}: not compared; <a href="#/compare/${esc(ids.map(encodeURIComponent).join(","))}">the link without ${gone.length === 1 ? "it" : "them"}</a>.</p>`;
    }
    const [cmp, losses, energies] = await Promise.all([
      api("/v1/compare?runs=" + ids.map(encodeURIComponent).join(",")),
      Promise.all(ids.map(id => api(`/v1/runs/${encodeURIComponent(id)}/series?metric=loss&agg=mean&points=${POINTS.compare}`))),
      Promise.all(ids.map(id => api(`/v1/runs/${encodeURIComponent(id)}/series?metric=energy&points=${POINTS.energy}`))),
    ]);
    if (gen !== generation) return;
    const rows = cmp.runs;
    const label = r => `${r.name} (${r.run_id.slice(0, 6)})`;
    const base = rows[0];
    const diff = (v, b, kind) => {
      if (v === null || b === null || v === undefined || b === undefined) return "";
      if (kind === "pct") return b ? ` <span class="delta">${v >= b ? "+" : "−"}${num(Math.abs(100 * (v - b) / b))} %</span>` : "";
      if (kind === "ratio") return b ? ` <span class="delta">×${num(v / b)}</span>` : "";
      return ` <span class="delta">${v >= b ? "+" : "−"}${num(Math.abs(v - b), 3)}</span>`;
    };
    const metric = (name, get, fmt, kind) => `<tr><th>${name}</th>` + rows.map((r, i) => `<td class="num">${fmt(get(r), r)}${i && kind ? diff(get(r), get(base), kind) : ""}</td>`).join("") + `</tr>`;
    const f = v => esc(num(v));
    $("#cmp-table").innerHTML = `<table class="cmp"><thead><tr><th></th>${rows.map((r, i) => `<th class="num"><span class="sw" data-i="${i}"></span><a href="#/run/${esc(r.run_id)}">${esc(r.name)}</a><br><small>${esc(r.run_id.slice(0, 8))}${i === 0 ? " · baseline" : ""}</small></th>`).join("")}</tr></thead><tbody>
      ${metric("status", r => r.status, v => statusBadge(v))}
      ${metric("started", (r) => runs[rows.indexOf(r)].created_at, v => esc(when(v)))}
      ${metric("duration", r => r.duration_s, v => esc(secs(v)), "pct")}
      ${metric("batches", r => r.n_batches, v => esc(String(v)), "pct")}
      ${metric("energy", r => r.energy_j, (v, r) => esc(qty(v, "J")) + " " + badge(r.source, r.measured), "pct")}
      ${metric("ΔI (bits/sample)", r => r.info_gain_bits, v => esc(bitsNum(v)), "abs")}
      ${metric("η (bits/J)", r => r.eta_bits_per_j, (v, r) => esc(etaNum(v, r.info_gain_bits)), "ratio")}
      ${metric("final loss (nats)", r => r.loss_now, f, "abs")}
      ${metric("final accuracy", r => r.final_accuracy, v => esc(num(v, 4)), "abs")}
      ${metric("tags", (r) => runs[rows.indexOf(r)].tags.join(", "), v => esc(v || "–"))}
      </tbody></table><p class="hint">Differences are against the first run (the baseline): % for energy, duration and batches, × for η, absolute for the rest.</p>`;
    document.querySelectorAll("#cmp-table .sw").forEach(sw => { sw.style.background = C.PALETTE[+sw.dataset.i % C.PALETTE.length]; });
    const series = rows.map((r, i) => {
      const t0 = runs[i].created_at, e = energies[i].points;
      return {
        name: label(r),
        time: losses[i].points.map(p => [p[0] - t0, p[1]]),
        energy: onEnergy(e, losses[i].points),
      };
    });
    // the daemon's bucket means (agg=mean: every batch, weighted by n), not a rolling mean
    // of LTTB points, which keep each bucket's extremes
    const note = "each run's loss as means of consecutive batches (" + rows.map((r, i) => `${r.name}: ${losses[i].bucket_batches || 1}`).join(", ") + " per point)";
    const noEnergy = r => r.energy_j === null || r.energy_j === undefined;
    const offEnergy = rows.filter((r, i) => !series[i].energy.length).map(r => `${r.name} (${noEnergy(r) ? "no energy" : "too few batches"})`);
    C.line($("#cmp-loss-energy"), {title: "Loss against cumulative energy", x: {label: "energy used by the run", unit: "J"}, y: {label: "loss", unit: "nats"},
      series: series.map(s => ({name: s.name, points: s.energy, width: 2})),
      empty: rows.every(noEnergy) ? "no energy readable for these runs" : "too few batches to place these runs on the energy axis",
      note: offEnergy.length ? `${note}; not on this chart: ${offEnergy.join(", ")}` : note});
    C.line($("#cmp-loss-time"), {title: "Loss against time", x: {label: "time since start", unit: "s", time: true}, y: {label: "loss", unit: "nats"},
      series: series.map(s => ({name: s.name, points: s.time, width: 2})), note});
    const missing = rows.filter(r => r.final_accuracy === null || r.energy_j === null).map(r => r.name);
    C.scatter($("#cmp-scatter"), {title: "Final accuracy against energy", x: {label: "energy", unit: "J"}, y: {label: "final accuracy", unit: ""},
      points: rows.map((r, i) => ({x: r.energy_j, y: r.final_accuracy, label: label(r), short: r.name})),
      empty: "no run has both an accuracy and an energy", note: missing.length ? `left out (no accuracy or energy): ${missing.join(", ")}` : ""});
  }

  // ---------------------------------------------------------------- shell
  let generation = 0;

  async function render() {
    generation += 1;
    const gen = generation;
    $("#error").hidden = true;
    if (OFFLINE) {
      await viewRun(OFFLINE.bundle.run.id, gen);
      return;
    }
    if (!sessionStorage.getItem(TOKEN_KEY)) { showLogin(); return; }
    const r = route();
    document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.view === r.view));
    document.title = "h3d";
    if (r.view === "run" && r.arg) await viewRun(decodeURIComponent(r.arg), gen);
    else if (r.view === "compare") await viewCompare(decodeURIComponent(r.arg || ""), gen);
    else await viewRuns(r.q, gen);
  }

  function start() {
    if (OFFLINE) document.body.classList.add("offline");
    else {
      takeTokenFromHash();
      window.addEventListener("hashchange", () => { takeTokenFromHash(); render().catch(showError); });
      // a header link to the view already shown changes no hash: it reloads the view instead
      document.querySelector("header").addEventListener("click", ev => {
        const a = ev.target.closest("a[href^='#']");
        if (a && a.getAttribute("href") === location.hash) { ev.preventDefault(); render().catch(showError); }
      });
    }
    render().catch(showError);
  }

  start();
})();
