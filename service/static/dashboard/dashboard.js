/* The mqsa dashboard: reads GET /stats (scope read) and draws it; nothing else is fetched.
 *
 * Page parameters (in the URL's query): minutes (the window, 1-1440, default 60) and
 * refresh (seconds between reads, 0 = off, default 10). The API key is typed once and
 * kept in this tab's sessionStorage; it is sent as X-API-Key.
 *
 * Number rule (tests/service/test_dashboard.py applies the same one):
 *   counts        whole numbers, a comma every three digits       12,101
 *   rates, shares percentage with 2 decimals                      7.50%
 *   latencies     milliseconds with 2 decimals                    2.40 ms
 *   offline       4 decimals (whole numbers as counts)            0.0800
 *   no value      an en dash                                      –
 * Every number carries a data-testid: <field>-<model_version>-<mode> in the model tiles
 * (impressions, clicks, hits, conversions, ctr, hit-rate, conversion-rate, coverage,
 * distinct-items, num-items, p50, p95, p99, fallbacks, fallback-<reason>,
 * offline-<metric>, nested names joined by dots: offline-valid.NDCG@20, role), share-<version>, shadow-<version>, champion, events-<type>,
 * window-minutes, attribution-window.
 */
(function () {
  "use strict";

  const KEY_STORAGE = "mqsa.dashboard.apiKey";
  const DASH = "\u2013";
  const COLORS = ["#2a6f97", "#e07a1f", "#3a9d5d", "#c0392b", "#8e44ad", "#7f8c8d", "#d4a017", "#16a5a5"];

  const WHOLE_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 1e7];

  const fmt = {
    count: (n) => (n == null ? DASH : String(Math.round(n)).replace(/\B(?=(\d{3})+(?!\d))/g, ",")),
    rate: (x) => (x == null ? DASH : (x * 100).toFixed(2) + "%"),
    ms: (x) => (x == null ? DASH : x.toFixed(2) + " ms"),
    metric: (x) => {
      if (typeof x === "number") return Number.isInteger(x) ? fmt.count(x) : x.toFixed(4);
      return x == null ? DASH : typeof x === "string" ? x : JSON.stringify(x);
    },
  };

  const state = { minutes: 60, refresh: 10, timer: null, charts: {}, updates: 0, inFlight: false };
  const $ = (id) => document.getElementById(id);

  function clampInt(text, fallback, low, high) {
    const n = Number.parseInt(text, 10);
    return Number.isFinite(n) && n >= low && n <= high ? n : fallback;
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function ensureOption(select, value, label) {
    if (![...select.options].some((o) => o.value === String(value))) select.append(el("option", { value }, label));
    select.value = String(value);
  }

  // ---- reading /stats -----------------------------------------------------------------------

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  async function readStats() {
    const headers = { Accept: "application/json" };
    if (apiKey()) headers["X-API-Key"] = apiKey();
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), 10000);
    try {
      const response = await fetch("stats?minutes=" + state.minutes, { headers, signal: controller.signal, cache: "no-store" });
      const body = await response.json().catch(() => null);
      return { status: response.status, body };
    } finally {
      clearTimeout(timeout);
    }
  }

  function problem(status, body) {
    const detail = body && body.detail ? " (" + body.detail + ")" : "";
    if (status === 401) {
      return apiKey()
        ? ["unauthorized", "The API key was refused (401)" + detail + ". Type a valid key with the read scope above."]
        : ["unauthorized", "The service needs an API key with the read scope (401): type it above and press Use key."];
    }
    if (status === 403) return ["forbidden", "This API key lacks the read scope that /stats needs (403)" + detail + ". Use a key with read."];
    if (status === 404) return ["error", "This service has no /stats route (404): is it an older version?"];
    return ["error", "/stats answered " + status + detail + "."];
  }

  async function refresh() {
    if (state.inFlight) return;
    state.inFlight = true;
    clearTimeout(state.timer);
    try {
      const { status, body } = await readStats();
      if (status === 200 && body) {
        render(body);
        showMessage(null);
        state.updates += 1;
        document.body.dataset.updates = String(state.updates);
        document.body.dataset.state = "ok";
        $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
      } else {
        const [kind, text] = problem(status, body);
        if (kind !== "error") clearData();
        document.body.dataset.state = kind;
        showMessage(text);
        if (kind !== "error") $("api-key").focus();
      }
    } catch (error) {
      document.body.dataset.state = "error";
      showMessage("The service did not answer: " + (error && error.name === "AbortError" ? "timed out" : error));
    } finally {
      state.inFlight = false;
      schedule();
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    if (state.refresh > 0) state.timer = setTimeout(refresh, state.refresh * 1000);
  }

  function showMessage(text) {
    const box = $("message");
    box.hidden = !text;
    box.textContent = text || "";
  }

  function clearData() {
    $("content").hidden = true;
    for (const chart of Object.values(state.charts)) chart.destroy();
    state.charts = {};
    for (const id of ["summary", "traffic-body", "models"]) $(id).replaceChildren();
  }

  // ---- drawing --------------------------------------------------------------------------------

  function render(stats) {
    $("content").hidden = false;
    renderSummary(stats);
    renderTraffic(stats.traffic);
    const models = stats.models || [];
    $("models").replaceChildren(...models.map(tile));
    if (!models.length) $("models").append(el("p", { class: "empty" }, "No model has served in this window."));
    renderCharts(models);
  }

  function renderSummary(stats) {
    const w = stats.window || {};
    const since = w.since ? new Date(w.since * 1000).toLocaleString() : DASH;
    const until = w.until ? new Date(w.until * 1000).toLocaleString() : DASH;
    const line = el("p");
    line.append("Window: ", el("b", { "data-testid": "window-minutes" }, fmt.count(w.minutes)), " minutes (" + since + " to " + until + "); attribution window ");
    line.append(el("b", { "data-testid": "attribution-window" }, fmt.count(stats.attribution_window_seconds)), " s.");
    const events = el("dl", { class: "events" });
    for (const [type, count] of Object.entries(stats.events || {})) {
      events.append(el("dt", {}, type), el("dd", { "data-testid": "events-" + type }, fmt.count(count)));
    }
    $("summary").replaceChildren(line, el("h2", {}, "Events in the window"), events);
  }

  function renderTraffic(traffic) {
    const body = $("traffic-body");
    if (!traffic) {
      body.replaceChildren(el("p", { class: "empty" }, "No A/B plan reported: the champion answers every request."));
      return;
    }
    const champion = el("p");
    champion.append("Champion: ", el("code", { "data-testid": "champion" }, traffic.champion || DASH));
    const table = el("table", { class: "shares" });
    table.createTHead().insertRow().append(el("th", {}, "model version"), el("th", {}, "share of requests"));
    const rows = table.createTBody();
    for (const [version, share] of Object.entries(traffic.shares || {})) {
      const name = el("td");
      name.append(el("code", {}, version), version === traffic.champion ? " (champion)" : "");
      rows.insertRow().append(name, el("td", { "data-testid": "share-" + version }, fmt.rate(share)));
    }
    const shadows = (traffic.shadow || []).map((s) => (typeof s === "string" ? s : s.model_version));
    const shadow = el("p");
    shadow.append("Shadow (scores every request, never served): ");
    if (!shadows.length) shadow.append("none");
    shadows.forEach((version, i) => shadow.append(i ? ", " : "", el("code", { "data-testid": "shadow-" + version }, version)));
    body.replaceChildren(champion, table, shadow);
  }

  function tile(model) {
    const id = model.model_version + "-" + model.mode;
    const card = el("article", { class: "tile", "data-testid": "tile-" + id });
    const title = el("h3");
    title.append(el("code", {}, model.model_version), " ", el("span", { class: "mode mode-" + model.mode }, model.mode), " ");
    title.append(el("span", { class: "role", "data-testid": "role-" + id }, model.role || "not loaded"));
    card.append(title);
    card.append(numbers(id, [
      ["impressions", "impressions", fmt.count(model.impressions)],
      ["clicks", "clicks", fmt.count(model.clicks)],
      ["hits", "hits", fmt.count(model.hits)],
      ["conversions", "conversions", fmt.count(model.conversions)],
      ["ctr", "CTR", fmt.rate(model.ctr)],
      ["hit-rate", "hit rate", fmt.rate(model.hit_rate)],
      ["conversion-rate", "conversion rate", fmt.rate(model.conversion_rate)],
      ["coverage", "coverage", fmt.rate(model.coverage)],
      ["distinct-items", "distinct items", fmt.count(model.distinct_items)],
      ["num-items", "items in the model", fmt.count(model.num_items)],
    ]));
    const latency = model.latency_ms || {};
    card.append(el("h4", {}, "Latency"), numbers(id, ["p50", "p95", "p99"].map((p) => [p, p, fmt.ms(latency[p])])));
    const fallbacks = Object.entries(model.fallbacks || {});
    const total = fallbacks.reduce((sum, [, n]) => sum + n, 0);
    card.append(el("h4", {}, "Fallbacks"), numbers(id, [["fallbacks", "all", fmt.count(total)], ...fallbacks.map(([reason, n]) => ["fallback-" + reason, reason, fmt.count(n)])]));
    const offline = flatten(model.offline_metrics, "", []);
    card.append(el("h4", {}, "Offline metrics (bundle)"));
    card.append(offline.length ? numbers(id, offline.map(([name, v]) => ["offline-" + name, name, fmt.metric(v)])) : el("p", { class: "empty" }, "none recorded"));
    return card;
  }

  // {"epoch": 12, "valid": {"NDCG@20": 0.08}} -> [["epoch", 12], ["valid.NDCG@20", 0.08]]
  function flatten(value, prefix, out) {
    for (const [key, v] of Object.entries(value || {})) {
      const name = prefix ? prefix + "." + key : key;
      if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, name, out);
      else out.push([name, v]);
    }
    return out;
  }

  function numbers(id, rows) {
    const list = el("dl", { class: "numbers" });
    for (const [field, label, text] of rows) {
      list.append(el("dt", {}, label), el("dd", { "data-testid": field + "-" + id }, text));
    }
    return list;
  }

  // ---- charts (uPlot) -------------------------------------------------------------------------

  const CHARTS = [
    { id: "chart-impressions", title: "Impressions per minute", value: (m) => m.impressions, format: fmt.count, whole: true },
    { id: "chart-ctr", title: "CTR per minute", value: (m) => ratio(m.clicks, m.impressions), format: fmt.rate },
    { id: "chart-hit-rate", title: "Hit rate per minute", value: (m) => ratio(m.hits, m.attributable), format: fmt.rate },
    { id: "chart-p99", title: "p99 latency per minute", value: (m) => (m.p99_ms == null ? null : m.p99_ms), format: fmt.ms },
  ];

  function ratio(a, b) {
    return b ? a / b : null;
  }

  function renderCharts(models) {
    const minutes = [...new Set(models.flatMap((m) => (m.series || []).map((p) => p.minute)))].sort((a, b) => a - b);
    const labels = models.map((m) => m.model_version.slice(0, 8) + " " + m.mode);
    const shape = labels.join("|");
    for (const spec of CHARTS) {
      const data = [minutes, ...models.map((m) => column(m.series || [], minutes, spec.value))];
      const chart = state.charts[spec.id];
      if (chart && chart.shape === shape) {
        chart.setData(data);
        continue;
      }
      if (chart) chart.destroy();
      state.charts[spec.id] = newChart(spec, labels, data);
      state.charts[spec.id].shape = shape;
    }
  }

  function column(series, minutes, value) {
    const byMinute = new Map(series.map((p) => [p.minute, p]));
    return minutes.map((t) => (byMinute.has(t) ? value(byMinute.get(t)) : null));
  }

  function newChart(spec, labels, data) {
    const target = $(spec.id);
    const series = [{}, ...labels.map((label, i) => ({
      label,
      stroke: COLORS[i % COLORS.length],
      width: 1.5,
      value: (u, v) => spec.format(v),
    }))];
    const options = {
      title: spec.title,
      width: chartWidth(target),
      height: 220,
      series,
      scales: { x: { time: true } },
      axes: [{}, { size: 70, values: (u, ticks) => ticks.map((t) => spec.format(t)), ...(spec.whole ? { incrs: WHOLE_STEPS } : {}) }],
    };
    return new uPlot(options, data, target);
  }

  function chartWidth(target) {
    return Math.max(280, (target.clientWidth || 600) - 4);
  }

  function resizeCharts() {
    for (const [id, chart] of Object.entries(state.charts)) chart.setSize({ width: chartWidth($(id)), height: 220 });
  }

  // ---- controls -------------------------------------------------------------------------------

  function keepInUrl() {
    const params = new URLSearchParams(location.search);
    params.set("minutes", state.minutes);
    params.set("refresh", state.refresh);
    history.replaceState(null, "", location.pathname + "?" + params);
  }

  function start() {
    const params = new URLSearchParams(location.search);
    state.minutes = clampInt(params.get("minutes"), 60, 1, 1440);
    state.refresh = clampInt(params.get("refresh"), 10, 0, 86400);
    ensureOption($("window"), state.minutes, state.minutes + " min");
    ensureOption($("refresh"), state.refresh, state.refresh + " s");
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      $("api-key").value = "";
      refresh();
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      clearData();
      refresh();
    });
    $("window").addEventListener("change", (event) => {
      state.minutes = clampInt(event.target.value, 60, 1, 1440);
      keepInUrl();
      refresh();
    });
    $("refresh").addEventListener("change", (event) => {
      state.refresh = clampInt(event.target.value, 10, 0, 86400);
      keepInUrl();
      schedule();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.refresh > 0) refresh();
    });
    window.addEventListener("resize", resizeCharts);
    refresh();
  }

  start();
})();
