// Sluice console: polls /console/api/state and drives the admin API. No framework, no build step.
// Every string from the server reaches the DOM through textContent (names, models and errors are
// attacker-influenced); innerHTML is never used.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const CONSOLE_HEADERS = { "X-Sluice-Console": "1" };
  const TABS = ["backends", "traffic", "keys", "usage", "playground"];
  let state = null;
  let pollTimer = null;
  let loggedIn = false;

  // ---------- helpers ----------

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "className") node.className = value;
      else node.setAttribute(name, String(value));
    }
    for (const child of children) node.append(child);
    return node;
  }

  let sayTimer = null;
  function say(message, bad = false) {
    const status = $("status");
    status.textContent = message;
    status.classList.toggle("bad", bad);
    clearTimeout(sayTimer);
    if (message && !bad) sayTimer = setTimeout(() => (status.textContent = ""), 6000); // errors stay
  }

  function showError(id, message) {
    const box = $(id);
    box.textContent = message || "";
    box.hidden = !message;
  }

  function errorMessage(data, response) {
    if (data && data.error && data.error.message) return String(data.error.message);
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  async function api(path, options = {}) {
    const init = {
      method: options.method || "GET",
      credentials: "same-origin",
      headers: { ...CONSOLE_HEADERS },
    };
    if (options.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    const response = await fetch(path, init);
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (response.status === 401) {
      showLogin(loggedIn); // "ended" only for a session this page had; a first visit just asks to log in
      throw new HttpError(401, "Your console session has ended: log in again.");
    }
    if (!response.ok) throw new HttpError(response.status, errorMessage(data, response));
    return data;
  }

  const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
  function num(value) {
    return value === null || value === undefined ? "—" : numberFormat.format(value);
  }
  function ms(value) {
    if (value === null || value === undefined) return "—";
    return value >= 10000 ? `${numberFormat.format(value / 1000)} s` : `${numberFormat.format(value)} ms`;
  }
  function when(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }
  function badge(text, kind) {
    return el("span", { className: `badge ${kind}`, text });
  }
  function cell(props = {}, children = []) {
    return el("td", props, children);
  }

  // ---------- login and tabs ----------

  function showLogin(expired = false) {
    loggedIn = false;
    $("app").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    clearTimeout(pollTimer);
    if (location.hash === "#login-failed") showError("login-error", "Wrong admin key");
    else if (expired) showError("login-error", "Your session has ended: log in again.");
    say("");
  }

  function showApp() {
    if (!loggedIn) {
      loggedIn = true;
      $("login").hidden = true;
      $("app").hidden = false;
      $("logout").hidden = false;
      showError("login-error", "");
      if (location.hash === "#login-failed") history.replaceState(null, "", "#backends");
      showTab();
    }
  }

  function currentTab() {
    const name = location.hash.slice(1);
    return TABS.includes(name) ? name : "backends";
  }

  function showTab() {
    const name = currentTab();
    for (const tab of TABS) {
      $(`tab-${tab}`).hidden = tab !== name;
      const link = document.querySelector(`.tabs a[data-tab="${tab}"]`);
      if (tab === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (!loggedIn) return;
    if (name === "traffic") drawTraffic();
    if (name === "keys") loadKeys();
    if (name === "usage") loadUsage();
  }

  // ---------- polling ----------

  async function poll() {
    clearTimeout(pollTimer);
    let delay = 2000;
    try {
      state = await api("/console/api/state");
      delay = Math.max(0.5, Number(state.refresh_seconds) || 2) * 1000;
      showApp();
      render();
      if ($("status").classList.contains("bad") && $("status").dataset.poll) say("");
      delete $("status").dataset.poll;
    } catch (error) {
      if (error.status === 401) return; // the login form is showing; polling resumes after logging in
      say(`Cannot reach the gateway (${error.message}); retrying…`, true);
      $("status").dataset.poll = "1";
    }
    pollTimer = setTimeout(poll, delay);
  }

  function render() {
    $("version").textContent = state.version ? `v${state.version}` : "";
    const time = state.server_time ? new Date(state.server_time * 1000) : new Date();
    $("updated").textContent = `updated ${time.toLocaleTimeString()}`;
    renderBackends();
    renderModels();
    if (currentTab() === "traffic") drawTraffic();
  }

  // ---------- backends ----------

  const backendRows = new Map();

  function backendRow(name) {
    let row = backendRows.get(name);
    if (row) return row;
    const button = el("button", { type: "button" });
    button.addEventListener("click", () => toggleDrain(name, button));
    row = { tr: el("tr", { "data-backend": name }), button };
    backendRows.set(name, row);
    return row;
  }

  function renderBackends() {
    const tbody = document.querySelector("#backends-table tbody");
    const seen = new Set();
    for (const backend of state.backends) {
      seen.add(backend.name);
      const row = backendRow(backend.name);
      fillBackendRow(row, backend);
      tbody.append(row.tr); // keeps the server's order; moving a row keeps its button's focus
    }
    for (const [name, row] of backendRows) {
      if (!seen.has(name)) {
        row.tr.remove();
        backendRows.delete(name);
      }
    }
    $("backends-empty").hidden = state.backends.length > 0;
  }

  function fillBackendRow(row, b) {
    const health = el("div", { className: "tags" }, [
      b.healthy ? badge("healthy", "ok") : badge("unhealthy", "bad"),
    ]);
    if (b.drained) health.append(badge("drained", "warn"));
    const healthCell = cell({ "data-col": "health" }, [health]);
    if (b.drained && b.drained_by && b.drained_by.length) {
      healthCell.append(el("span", { className: "sub", text: `by ${b.drained_by.join(", ")}` }));
    }

    const circuitKind = { closed: "ok", open: "bad", half_open: "warn" }[b.circuit] || "info";
    const circuitCell = cell({ "data-col": "circuit" }, [badge(String(b.circuit).replace("_", "-"), circuitKind)]);
    for (const [model, circuit] of Object.entries(b.model_circuits || {})) {
      if (circuit !== "closed") circuitCell.append(el("span", { className: "sub", text: `${model}: ${circuit}` }));
    }

    const kvCell = cell({ "data-col": "kv" });
    if (b.kv_cache_usage === null || b.kv_cache_usage === undefined) {
      kvCell.textContent = "—";
    } else {
      const percent = Math.max(0, Math.min(100, b.kv_cache_usage * 100));
      const fill = el("div", { className: `fill${percent >= 90 ? " bad" : percent >= 75 ? " warn" : ""}` });
      fill.style.width = `${percent}%`;
      kvCell.append(
        el("div", { className: "kv" }, [
          el("div", { className: "bar", "aria-hidden": "true" }, [fill]),
          el("span", { className: "num", text: `${percent.toFixed(0)} %` }),
        ]),
      );
    }

    const models = el("div", { className: "tags" });
    for (const model of b.models || []) models.append(el("span", { className: "tag", text: model }));
    for (const adapter of b.adapters || []) {
      models.append(el("span", { className: "tag lora", title: "LoRA adapter", text: `${adapter} (LoRA)` }));
    }
    if (!models.childElementCount) models.append(el("span", { className: "muted", text: "none discovered" }));

    const waiting = b.running === null || b.running === undefined ? "—" : `${num(b.running)} / ${num(b.waiting)}`;
    row.button.textContent = b.drained ? "Undrain" : "Drain";
    row.button.className = b.drained ? "" : "danger";
    row.button.setAttribute("aria-label", `${b.drained ? "Undrain" : "Drain"} ${b.name}`);
    row.button.dataset.action = b.drained ? "undrain" : "drain";
    const cells = [
      cell({ "data-col": "name" }, [el("strong", { text: b.name }), el("span", { className: "sub", text: b.url })]),
      healthCell,
      circuitCell,
      cell({ className: "num", "data-col": "in-flight", text: num(b.in_flight) }),
      cell({ className: "num", "data-col": "running", text: waiting }),
      kvCell,
      cell({ "data-col": "models" }, [models]),
      cell({ className: "err", "data-col": "last-error", text: b.last_error || "" }),
    ];
    // Replace every cell but the button's, so the Drain button (and its focus) survives the refresh.
    let keep = row.tr.lastElementChild;
    if (!keep) {
      keep = cell({ "data-col": "action" }, [row.button]);
      row.tr.append(keep);
    }
    while (row.tr.firstChild !== keep) row.tr.firstChild.remove();
    keep.before(...cells);
  }

  async function toggleDrain(name, button) {
    const action = button.dataset.action;
    const question =
      action === "drain"
        ? `Drain backend "${name}"? It stops getting new requests; requests in flight finish.`
        : `Undrain backend "${name}"? It gets new requests again (unless an alert still drains it).`;
    if (!window.confirm(question)) return;
    button.disabled = true;
    showError("backends-error", "");
    try {
      const answer = await api(`/admin/backends/${encodeURIComponent(name)}/${action}`, { method: "POST" });
      say(answer.drained ? `${name} is drained.` : `${name} is back in rotation.`);
    } catch (error) {
      showError("backends-error", error.message);
      say(`${action} ${name} failed: ${error.message}`, true);
    } finally {
      button.disabled = false;
      poll();
    }
  }

  function renderModels() {
    const models = state.models || [];
    const rag = new Set(state.rag_routes || []);
    const select = $("play-model");
    const signature = models.map((m) => (rag.has(m) ? `${m}\u0000rag` : m)).join("\u0001");
    if (select.dataset.signature === signature) return;
    select.dataset.signature = signature;
    const chosen = select.value;
    select.replaceChildren(
      ...models.map((m) => el("option", { value: m, text: rag.has(m) ? `${m} (RAG)` : m })),
    );
    if (models.includes(chosen)) select.value = chosen;
    $("model-list").replaceChildren(...models.map((m) => el("option", { value: m })));
  }

  // ---------- traffic charts (canvas, no library) ----------

  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const seriesColor = (i) => css(`--series-${(i % 6) + 1}`);

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  function drawChart(canvas, series, { from, to, max, unit = "" }) {
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const pad = { left: 48, right: 8, top: 8, bottom: 18 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    let top = max;
    if (top === undefined) {
      let highest = 0;
      for (const s of series) for (const [, v] of s.values) if (v !== null && v > highest) highest = v;
      top = niceMax(highest);
    }
    const x = (t) => pad.left + ((t - from) / (to - from)) * plotW;
    const y = (v) => pad.top + plotH - (Math.min(v, top) / top) * plotH;

    g.font = `11px ${getComputedStyle(document.body).fontFamily}`;
    g.lineWidth = 1;
    g.strokeStyle = css("--grid");
    g.fillStyle = css("--muted");
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (const fraction of [0, 0.5, 1]) {
      const value = top * fraction;
      const py = Math.round(y(value)) + 0.5;
      g.beginPath();
      g.moveTo(pad.left, py);
      g.lineTo(width - pad.right, py);
      g.stroke();
      g.fillText(`${numberFormat.format(value)}${unit}`, pad.left - 6, py);
    }
    g.textBaseline = "top";
    g.textAlign = "center";
    const span = to - from;
    const tick = span > 240 ? 60 : span > 90 ? 30 : 10;
    for (let ago = 0; ago < span; ago += tick) {
      const px = x(to - ago);
      g.textAlign = ago === 0 ? "right" : "center";
      g.fillText(ago === 0 ? "now" : `-${ago >= 60 ? `${ago / 60}m` : `${ago}s`}`, px, pad.top + plotH + 4);
    }

    g.lineWidth = 2;
    g.lineJoin = "round";
    for (const s of series) {
      g.strokeStyle = s.color;
      g.fillStyle = s.color;
      g.setLineDash(s.dashed ? [5, 4] : []);
      g.beginPath();
      let drawing = false;
      let lone = null;
      for (const [t, v] of s.values) {
        if (v === null || v === undefined || t < from) {
          if (lone) g.fillRect(lone[0] - 1.5, lone[1] - 1.5, 3, 3);
          drawing = false;
          lone = null;
          continue;
        }
        const px = x(t);
        const py = y(v);
        if (drawing) {
          g.lineTo(px, py);
          lone = null;
        } else {
          g.moveTo(px, py);
          lone = [px, py];
        }
        drawing = true;
      }
      if (lone) g.fillRect(lone[0] - 1.5, lone[1] - 1.5, 3, 3);
      g.stroke();
    }
    g.setLineDash([]);
  }

  function legend(canvas, entries) {
    const list = canvas.nextElementSibling;
    list.replaceChildren(
      ...entries.map(({ label, color }) => {
        const swatch = el("span", { className: "swatch", "aria-hidden": "true" });
        swatch.style.background = color;
        return el("li", {}, [swatch, label]);
      }),
    );
  }

  function latest(values) {
    for (let i = values.length - 1; i >= 0; i -= 1) if (values[i][1] !== null) return values[i][1];
    return null;
  }

  function drawTraffic() {
    if (!state || !state.traffic) return;
    const points = state.traffic.points || [];
    const interval = Number(state.traffic.interval) || 2;
    const to = points.length ? points[points.length - 1].t : state.server_time;
    // Up to the 5 minutes kept; a younger series is shown over at least one minute, not squeezed at the right.
    const age = points.length ? to - points[0].t + interval : 0;
    const range = { from: to - Math.min(150 * interval, Math.max(60, age)), to };
    const pick = (f) => points.map((p) => [p.t, f(p)]);

    const simple = [
      ["chart-rps", [["requests/s", (p) => p.rps, 0]], {}],
      ["chart-errors", [["errors/s", (p) => p.errors_per_s, 4], ["rate-limited/s", (p) => p.rate_limited_per_s, 1]], {}],
      ["chart-cache", [["hit rate", (p) => (p.cache_hit_rate === null ? null : p.cache_hit_rate * 100), 2]], { max: 100, unit: "%" }],
    ];
    for (const [id, defs, options] of simple) {
      const canvas = $(id);
      const series = defs.map(([label, f, color]) => ({ label, color: seriesColor(color), values: pick(f) }));
      drawChart(canvas, series, { ...range, ...options });
      legend(canvas, series);
      const summary = series.map((s) => `${s.label} ${num(latest(s.values))}${options.unit || ""}`).join(", ");
      canvas.setAttribute("aria-label", `${canvas.parentElement.firstElementChild.textContent}: latest ${summary}`);
    }

    const models = [...new Set(points.flatMap((p) => Object.keys(p.models || {})))].sort();
    for (const [id, metric] of [["chart-ttft", "ttft"], ["chart-latency", "latency"]]) {
      const canvas = $(id);
      const series = [];
      models.forEach((model, i) => {
        for (const q of ["p50", "p99"]) {
          const values = pick((p) => ((p.models || {})[model] || {})[`${metric}_${q}_ms`] ?? null);
          series.push({ label: model, color: seriesColor(i), dashed: q === "p99", values });
        }
      });
      drawChart(canvas, series, range);
      legend(canvas, models.map((model, i) => ({ label: model, color: seriesColor(i) })));
      canvas.setAttribute("aria-label", `${canvas.parentElement.firstElementChild.textContent} for ${models.length} models`);
    }
    renderModelTable(points, models);
  }

  function renderModelTable(points, models) {
    const rows = models.map((model) => {
      const point = [...points].reverse().find((p) => (p.models || {})[model]);
      const m = point.models[model];
      return el("tr", { "data-model": model }, [
        el("th", { scope: "row", text: model }),
        cell({ className: "num", text: num(m.rps) }),
        cell({ className: "num", text: ms(m.ttft_p50_ms) }),
        cell({ className: "num", text: ms(m.ttft_p99_ms) }),
        cell({ className: "num", text: ms(m.latency_p50_ms) }),
        cell({ className: "num", text: ms(m.latency_p99_ms) }),
      ]);
    });
    if (!rows.length) rows.push(el("tr", {}, [cell({ colspan: 6, className: "muted", text: "No traffic in the last 5 minutes." })]));
    document.querySelector("#models-table tbody").replaceChildren(...rows);
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => currentTab() === "traffic" && drawTraffic(), 100);
  });

  // ---------- keys ----------

  async function loadKeys() {
    showError("keys-error", "");
    try {
      const all = $("show-revoked").checked ? "?all=1" : "";
      const listing = await api(`/admin/keys${all}`);
      renderKeys(listing.data || []);
    } catch (error) {
      if (error.status !== 401) showError("keys-error", error.message);
    }
  }

  function renderKeys(keys) {
    const rows = keys.map((k) => {
      const stateKind = { active: "ok", revoked: "bad", expired: "warn" }[k.state] || "info";
      const action = cell();
      if (k.state !== "revoked") {
        const button = el("button", { type: "button", className: "danger", "aria-label": `Revoke ${k.name}`, text: "Revoke" });
        button.addEventListener("click", () => revokeKey(k, button));
        action.append(button);
      }
      return el("tr", { "data-key-id": k.id }, [
        el("th", { scope: "row", text: k.name }),
        cell({ className: "mono small", text: k.id }),
        cell({ className: "mono small", text: k.prefix ? `${k.prefix}…` : "" }),
        cell({}, [badge(k.state || "active", stateKind)]),
        cell({ text: k.models ? k.models.join(", ") : "all" }),
        cell({ text: k.tenant || "—" }),
        cell({ className: "num", text: num(k.requests_per_minute) }),
        cell({ className: "num", text: num(k.tokens_per_minute) }),
        cell({ className: "num", text: num(k.max_concurrency) }),
        cell({ text: when(k.created_at) }),
        cell({ text: k.expires_at ? when(k.expires_at) : "never" }),
        action,
      ]);
    });
    document.querySelector("#keys-table tbody").replaceChildren(...rows);
    $("keys-empty").hidden = rows.length > 0;
  }

  async function revokeKey(key, button) {
    if (!window.confirm(`Revoke key "${key.name}"? Every client using it is refused at once. This cannot be undone.`)) return;
    button.disabled = true;
    try {
      await api(`/admin/keys/${encodeURIComponent(key.id)}/revoke`, { method: "POST" });
      say(`Key ${key.name} revoked.`);
    } catch (error) {
      showError("keys-error", error.message);
      button.disabled = false;
    }
    loadKeys();
  }

  $("create-key").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const body = { name: $("key-name").value.trim() };
    const models = $("key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
    if (models.length) body.models = models;
    if ($("key-tenant").value.trim()) body.tenant = $("key-tenant").value.trim();
    const limits = { requests_per_minute: "key-rpm", tokens_per_minute: "key-tpm", max_concurrency: "key-concurrency" };
    for (const [field, id] of Object.entries(limits)) {
      if ($(id).value !== "") body[field] = Number.parseInt($(id).value, 10);
    }
    showError("create-error", "");
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const created = await api("/admin/keys", { method: "POST", body });
      $("new-key-name").textContent = created.name;
      $("new-key-value").textContent = created.key;
      $("new-key").hidden = false;
      $("new-key").focus();
      form.reset();
      say(`Key ${created.name} created; copy it now.`);
      loadKeys();
    } catch (error) {
      if (error.status !== 401) showError("create-error", error.message);
    } finally {
      submit.disabled = false;
    }
  });

  $("copy-key").addEventListener("click", async () => {
    const value = $("new-key-value").textContent;
    try {
      await navigator.clipboard.writeText(value);
    } catch (_) {
      const range = document.createRange(); // the older way, for browsers without the async clipboard
      range.selectNodeContents($("new-key-value"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      if (!document.execCommand("copy")) {
        say("Copying failed: the key is selected, press Ctrl+C.", true);
        return;
      }
    }
    say("Key copied to the clipboard.");
  });

  $("dismiss-key").addEventListener("click", () => {
    $("new-key-value").textContent = ""; // the key leaves the page
    $("new-key-name").textContent = "";
    $("new-key").hidden = true;
    $("key-name").focus();
  });
  $("show-revoked").addEventListener("change", loadKeys);
  $("reload-keys").addEventListener("click", loadKeys);

  // ---------- usage ----------

  async function loadUsage() {
    showError("usage-error", "");
    const since = $("usage-period").value;
    try {
      const report = await api(`/admin/usage?since=${encodeURIComponent(since)}&daily=0`);
      renderUsage(report);
    } catch (error) {
      if (error.status !== 401) showError("usage-error", error.message);
    }
  }

  function renderUsage(report) {
    const rows = report.data || [];
    const total = { requests: 0, errors: 0, prompt_tokens: 0, completion_tokens: 0 };
    const body = rows.map((r) => {
      for (const field of Object.keys(total)) total[field] += Number(r[field]) || 0;
      const who = el("th", { scope: "row", text: r.key_name || r.key_id || "(no caller)" });
      if (r.key_id && r.key_name && r.key_id !== r.key_name) who.append(el("span", { className: "sub mono", text: r.key_id }));
      return el("tr", {}, [
        who,
        cell({ text: r.model || "—" }),
        cell({ className: "num", text: num(r.requests) }),
        cell({ className: "num", text: num(r.errors) }),
        cell({ className: "num", text: num(r.prompt_tokens) }),
        cell({ className: "num", text: num(r.completion_tokens) }),
        cell({ className: "num", text: ms(r.latency_p50_ms) }),
        cell({ className: "num", text: ms(r.latency_p99_ms) }),
        cell({ className: "num", text: ms(r.ttft_p50_ms) }),
      ]);
    });
    document.querySelector("#usage-table tbody").replaceChildren(...body);
    const foot = rows.length
      ? [el("tr", {}, [
          el("th", { scope: "row", text: "Total" }), cell(),
          cell({ className: "num", text: num(total.requests) }),
          cell({ className: "num", text: num(total.errors) }),
          cell({ className: "num", text: num(total.prompt_tokens) }),
          cell({ className: "num", text: num(total.completion_tokens) }),
          cell({ colspan: 3 }),
        ])]
      : [];
    document.querySelector("#usage-table tfoot").replaceChildren(...foot);
    $("usage-empty").hidden = rows.length > 0;
    $("usage-window").textContent = report.since ? `${when(report.since)} – ${when(report.until)}` : "";
  }

  $("usage-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadUsage();
  });
  $("usage-period").addEventListener("change", loadUsage);

  // ---------- playground ----------

  let playing = null;

  function setMeta(id, value) {
    $(id).textContent = value === null || value === undefined || value === "" ? "—" : String(value);
  }

  function showSources(sources) {
    if (!Array.isArray(sources) || !sources.length) return;
    $("play-sources").replaceChildren(
      ...sources.map((s, i) => {
        const label = typeof s === "object" && s !== null
          ? `[${i + 1}] ${s.title || s.source || "?"}${s.source && s.title ? ` — ${s.source}` : ""}${s.score !== undefined ? ` (score ${s.score})` : ""}`
          : `[${i + 1}] ${s}`;
        return el("li", { text: label });
      }),
    );
    $("play-sources-box").hidden = false;
  }

  async function readStream(response, output, started) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let first = true;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") {
          reader.cancel().catch(() => {});
          return;
        }
        let event;
        try {
          event = JSON.parse(data);
        } catch (_) {
          continue;
        }
        if (event.error) {
          showError("play-error", `Error from the gateway: ${event.error.message || JSON.stringify(event.error)}`);
          continue;
        }
        if (event.sources) showSources(event.sources);
        const content = event.choices && event.choices[0] && event.choices[0].delta && event.choices[0].delta.content;
        if (content) {
          if (first) {
            setMeta("play-ttft", ms(performance.now() - started));
            first = false;
          }
          output.appendData(content);
          $("play-output").scrollTop = $("play-output").scrollHeight;
        }
      }
    }
  }

  $("play-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (playing) playing.abort();
    const controller = new AbortController();
    playing = controller;
    const box = $("play-output");
    const output = document.createTextNode("");
    box.replaceChildren(output);
    box.setAttribute("aria-busy", "true");
    for (const id of ["play-backend", "play-cache", "play-served-model", "play-grounded", "play-ttft", "play-total", "play-request-id"]) setMeta(id, null);
    showError("play-error", "");
    $("play-sources-box").hidden = true;
    $("play-send").disabled = true;
    $("play-stop").disabled = false;
    say("Waiting for the answer…");
    const model = $("play-model").value;
    const request = { model, messages: [{ role: "user", content: $("play-prompt").value }], stream: true };
    if ($("play-temperature").value !== "") request.temperature = Number($("play-temperature").value);
    const started = performance.now();
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        credentials: "same-origin",
        headers: { ...CONSOLE_HEADERS, "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(request),
        signal: controller.signal,
      });
      const header = (name) => response.headers.get(name);
      const cache = header("X-Sluice-Cache");
      setMeta("play-backend", header("X-Sluice-Backend") || (cache && cache.startsWith("hit") ? "none (cache hit)" : null));
      setMeta("play-cache", cache);
      setMeta("play-served-model", header("X-Sluice-Model") || model);
      setMeta("play-grounded", header("X-Sluice-Grounded"));
      setMeta("play-request-id", header("X-Request-Id"));
      if (header("X-Sluice-Sources")) {
        try {
          showSources(JSON.parse(header("X-Sluice-Sources")));
        } catch (_) {
          showSources([header("X-Sluice-Sources")]);
        }
      }
      if (response.status === 401) {
        showLogin(true);
        throw new Error("Your console session has ended: log in again.");
      }
      if (!response.ok) {
        let data = null;
        try {
          data = await response.json();
        } catch (_) {
          data = null;
        }
        throw new Error(errorMessage(data, response));
      }
      if ((header("Content-Type") || "").includes("text/event-stream")) {
        await readStream(response, output, started);
      } else {
        const whole = await response.json();
        const message = whole.choices && whole.choices[0] && whole.choices[0].message;
        output.appendData((message && message.content) || "");
        if (whole.sources) showSources(whole.sources);
      }
      setMeta("play-total", ms(performance.now() - started));
      say($("play-error").hidden ? "Answer complete." : "The answer ended with an error.", !$("play-error").hidden);
    } catch (error) {
      if (error.name === "AbortError") say("Stopped.");
      else {
        showError("play-error", error.message);
        say("The request failed.", true);
      }
    } finally {
      if (playing === controller) {
        playing = null;
        box.setAttribute("aria-busy", "false");
        $("play-send").disabled = false;
        $("play-stop").disabled = true;
      }
    }
  });

  $("play-stop").addEventListener("click", () => playing && playing.abort());

  // ---------- start ----------

  window.addEventListener("hashchange", () => {
    if (location.hash === "#login-failed") return;
    showTab();
  });
  if (location.hash === "#login-failed") showError("login-error", "Wrong admin key");
  showTab();
  poll();
})();
