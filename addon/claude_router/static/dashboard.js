// The router's dashboard: polls dashboard.json (same origin, relative URLs only) and redraws.
// Every value from the router is put in the page as text (textContent), never as HTML:
// models, errors and reasons come from clients and relays.
"use strict";
(function () {
  const COLORS = ["#2e90fa", "#f79009", "#12b76a", "#9e77ed", "#f04438", "#0ba5ec", "#ee46bc", "#667085"];
  const charts = {};
  let last = null;        // the latest document
  let fetchedAt = 0;      // when it came (ms)
  let timer = null;

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function num(v) { return el("td", v === undefined || v === null ? "" : v, "num"); }
  function money(v) { return v === undefined || v === null ? "" : Number(v).toFixed(4); }
  function hms(t) { return new Date(t * 1000).toLocaleTimeString([], {hour12: false}); }
  function setRows(table, rows) {
    const body = document.querySelector(table + " tbody");
    body.replaceChildren(...rows);
  }

  function cooldownText(e) {
    const left = (e.cooldown_seconds_left || 0) - (Date.now() - fetchedAt) / 1000;
    return left > 0 ? Math.ceil(left) + " s" : "";
  }

  function endpointRow(e, canAct) {
    const tr = el("tr");
    tr.dataset.endpoint = e.name;
    tr.append(num(e.index), el("td", e.name));
    const state = el("td");
    const badge = el("span", e.state, "state state-" + e.state.split(" ")[0]);
    state.append(badge);
    if (e.cooling_for) state.append(el("span", " " + e.cooling_for, "muted"));
    tr.append(state);
    const cd = el("td", cooldownText(e), "num cooldown");
    tr.append(cd, num(e.served), num(e.failed), num(money(e.spend_usd)),
      num(e.cache_read_ratio === null || e.cache_read_ratio === undefined ? "" : Math.round(e.cache_read_ratio * 100) + " %"));
    const bal = num(e.balance_usd === undefined || e.balance_usd === null ? "" : Number(e.balance_usd).toFixed(2));
    if (e.balance_checked) bal.title = "checked " + e.balance_checked;
    tr.append(bal, num(e.sessions_pinned), el("td", e.last_error, "err"));
    const actions = el("td", null, "act-col");
    if (canAct) {
      const toggle = e.state === "disabled" ? "enable" : "disable";
      for (const action of [toggle, "reset"]) {
        const b = el("button", action);
        b.dataset.action = action;
        b.dataset.endpoint = e.name;
        b.addEventListener("click", () => act(action, e.name, b));
        actions.append(b);
      }
    }
    tr.append(actions);
    return tr;
  }

  function clientRow(c) {
    const tr = el("tr");
    tr.dataset.client = c.client || "-";
    const bar = el("div", null, "bar");
    const fill = el("div");
    if (c.budget_usd) {
      const share = Math.min(1, (c.spent_usd || 0) / c.budget_usd);
      fill.style.width = (share * 100).toFixed(1) + "%";
      if (share >= 1) bar.classList.add("over");
    } else fill.style.width = "0";
    bar.append(fill);
    const barCell = el("td");
    barCell.append(bar);
    const refused = Object.entries(c.refused || {}).map(([k, v]) => k + ":" + v).join(", ");
    tr.append(el("td", c.client || "-"), el("td", c.period), num(money(c.spent_usd)),
      num(c.budget_usd === null ? "none" : money(c.budget_usd)), barCell, num(money(c.remaining_usd)),
      el("td", (c.resets_at || "").replace("T", " ").replace("Z", "")), num(c.in_flight), num(c.requests),
      el("td", refused));
    return tr;
  }

  function requestRow(q) {
    const tr = el("tr");
    const ok = q.status >= 200 && q.status < 300;
    tr.append(el("td", hms(q.t)), el("td", q.client), el("td", q.model, "wrap"), el("td", q.endpoint || "router"),
      el("td", q.attempts, "wrap"), el("td", q.status, ok ? "num status-ok" : "num status-bad"),
      num(q.input_tokens + "/" + q.output_tokens), num(q.cache_write_tokens + "/" + q.cache_read_tokens),
      num(money(q.cost_usd)), el("td", q.reason, "wrap"));
    return tr;
  }

  function sessionRow(s) {
    const tr = el("tr");
    tr.append(el("td", s.session), el("td", s.client), el("td", s.endpoint), num(s.turns), num(s.prompt_tokens),
      el("td", s.warm ? "yes" : "no"), el("td", s.moved_from || ""), el("td", s.why || "", "wrap"));
    return tr;
  }

  function drawChart(id, minutes, series, names, fmt) {
    const box = document.getElementById(id);
    const data = [minutes, ...names.map((n) => series[n] || minutes.map(() => 0))];
    const key = names.join("\u0000");
    const width = Math.max(300, box.clientWidth || 300);
    // The hour's total per endpoint, under the chart's title (what a reader checks first).
    const sums = names.map((n) => [n, (series[n] || []).reduce((a, b) => a + b, 0)]).filter(([, v]) => v > 0);
    document.getElementById(id + "-total").textContent =
      sums.map(([n, v]) => n + " " + (fmt ? v.toFixed(4) : v)).join(", ");
    let c = charts[id];
    if (c && c.key === key) {
      c.plot.setData(data);
      if (Math.abs(c.plot.width - width) > 4) c.plot.setSize({width, height: 180});
      return;
    }
    if (c) c.plot.destroy();
    const opts = {
      width, height: 180,
      scales: {x: {time: true}, y: {range: (u, lo, hi) => [0, Math.max(hi, fmt ? 0.0001 : 1)]}},
      series: [{}, ...names.map((n, i) => ({label: n, stroke: COLORS[i % COLORS.length], width: 1.5,
        points: {size: 4}, value: fmt ? (u, v) => (v === null ? "" : v.toFixed(4)) : undefined}))],
      axes: [{}, {size: 56, values: fmt ? (u, vals) => vals.map((v) => v.toFixed(4)) : undefined}],
    };
    charts[id] = {key, plot: new uPlot(opts, data, box)};
  }

  function render(doc) {
    document.getElementById("store").textContent = "health: " + doc.store;
    document.getElementById("source").textContent =
      doc.source === "ledger" ? "history: ledger" : doc.source === "off" ? "history: off (router_ledger=off)" : "history: ledger unreadable";
    document.getElementById("updated").textContent = "updated " + hms(doc.now);
    setRows("#endpoints", doc.endpoints.map((e) => endpointRow(e, doc.can_act)));
    document.querySelectorAll(".act-col").forEach((c) => { c.hidden = !doc.can_act; });

    const names = doc.endpoints.map((e) => e.name);
    const chart = doc.chart;
    const totals = document.getElementById("chart-totals");
    if (chart) {
      if (typeof uPlot === "undefined") {
        // (this script runs first, so the first document is asked for before the chart
        // library is parsed; the charts follow as soon as it is)
        window.addEventListener("load", () => render(last), {once: true});
      } else {
        drawChart("chart-requests", chart.minutes, chart.requests, names, false);
        drawChart("chart-failed", chart.minutes, chart.failed, names, false);
        drawChart("chart-spend", chart.minutes, chart.spend, names, true);
      }
      const t = chart.totals;
      totals.textContent = t.requests + " requests, " + t.failovers + " failover" + (t.failovers === 1 ? "" : "s") +
        ", $" + Number(t.spend_usd).toFixed(4);
      totals.dataset.requests = t.requests;
      totals.dataset.failovers = t.failovers;
    } else {
      totals.textContent = "no history: the ledger is off or unreadable";
    }

    const clients = doc.clients || [];
    document.getElementById("clients-section").hidden = clients.length === 0;
    setRows("#clients", clients.map(clientRow));
    setRows("#requests", (doc.requests || []).map(requestRow));
    const sessions = doc.sessions || {count: 0, recent: []};
    document.getElementById("sessions-count").textContent = sessions.count + " pinned";
    setRows("#sessions", (sessions.recent || []).map(sessionRow));
  }

  function problem(text) {
    const p = document.getElementById("problem");
    p.hidden = !text;
    p.textContent = text || "";
  }

  async function poll() {
    clearTimeout(timer);
    const started = Date.now();
    let wait = 2000;
    try {
      // (the first one is the page's preload; the router answers no-store: none is cached)
      const r = await fetch("dashboard.json", {credentials: "same-origin"});
      if (!r.ok) throw new Error("dashboard.json: HTTP " + r.status);
      const doc = await r.json();
      last = doc;
      fetchedAt = Date.now();
      wait = (doc.poll_seconds || 2) * 1000;
      render(doc);
      problem("");
      if (!performance.getEntriesByName("dashboard-drawn").length) performance.mark("dashboard-drawn");
    } catch (e) {
      problem(String(e.message || e) + " (retrying)");
    }
    timer = setTimeout(poll, Math.max(100, wait - (Date.now() - started)));  // every 2 s, not 2 s apart
  }

  async function act(action, endpoint, button) {
    button.disabled = true;
    try {
      const r = await fetch("action", {
        method: "POST", credentials: "same-origin",
        headers: {"content-type": "application/json", "x-router-action": "1"},
        body: JSON.stringify({action, endpoint}),
      });
      if (!r.ok) {
        let msg = "HTTP " + r.status;
        try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
        problem(action + " " + endpoint + ": " + msg);
      } else problem("");
    } catch (e) {
      problem(action + " " + endpoint + ": " + (e.message || e));
    }
    poll();
  }

  setInterval(() => {  // the cooldowns count down between polls
    if (!last) return;
    document.querySelectorAll("#endpoints tbody tr").forEach((tr) => {
      const e = last.endpoints.find((x) => x.name === tr.dataset.endpoint);
      const cell = tr.querySelector(".cooldown");
      if (e && cell) cell.textContent = cooldownText(e);
    });
  }, 1000);
  window.addEventListener("resize", () => { if (last) render(last); });
  poll();
})();
