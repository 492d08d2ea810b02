// The console's behaviour beyond htmx: the dataset upload (the file is the request body), the
// evaluator builder (scorers added by clicking; JSON built from the inputs and validated by the
// reward service as you type), choice toggles, and a job's live curves (server-sent events
// drawn with uPlot). No build step: plain ES2020, loaded with `defer`.
(() => {
  "use strict";
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  // ---- Dataset upload ---------------------------------------------------------------------
  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (form.id !== "upload-form") return;
    ev.preventDefault();
    const file = $("#upload-file", form).files[0];
    const params = new URLSearchParams({
      name: $("#upload-name", form).value.trim(),
      kind: $("#upload-kind", form).value,
      description: $("#upload-description", form).value,
      filename: file ? file.name : "",
    });
    const out = $("#upload-result");
    out.textContent = "Uploading…";
    const response = await fetch(`${form.action}?${params}`, { method: "POST", body: file || "" });
    out.innerHTML = await response.text();
    htmx.process(out);
  });

  // ---- Evaluator builder ------------------------------------------------------------------
  let scorerCount = 0;
  let validateTimer = null;

  function readInput(el) {
    const raw = el.value.trim();
    if (raw === "") return undefined;
    const num = Number(raw);
    switch (el.dataset.kind) {
      case "int": return Number.isInteger(num) ? num : raw;  // a bad number is reported by path
      case "number": return Number.isNaN(num) ? raw : num;
      case "bool": return raw === "true";
      case "list": return raw.split(",").map((s) => s.trim()).filter(Boolean);
      case "json": try { return JSON.parse(raw); } catch { return raw; }
      default: return raw;
    }
  }

  function setPath(obj, path, value) {
    const parts = path.split(".");
    let at = obj;
    for (const p of parts.slice(0, -1)) at = at[p] = at[p] || {};
    at[parts[parts.length - 1]] = value;
  }

  function buildSpec() {
    const scorers = $$("#scorers > fieldset.scorer").map((fs) => {
      const scorer = {};
      for (const el of $$("[data-path]", fs)) {
        const value = readInput(el);
        if (value !== undefined) setPath(scorer, el.dataset.path, value);
      }
      scorer[fs.dataset.type] = scorer[fs.dataset.type] || {};
      return scorer;
    });
    return { scorers };
  }

  function refreshJson() {
    const view = $("#evaluator-json-view");
    if (!view) return;
    const json = JSON.stringify(buildSpec(), null, 2);
    view.textContent = json;
    $("#evaluator-json").value = json;
    clearTimeout(validateTimer);
    validateTimer = setTimeout(() => {
      htmx.ajax("POST", `${document.body.dataset.base}/evaluators/validate`, {
        target: "#evaluator-check", values: { spec_json: json },
      });
    }, 250);
  }

  function markErrors() {
    for (const el of $$("#scorers .field-error")) el.textContent = "";
    for (const el of $$("#scorers [aria-invalid]")) el.removeAttribute("aria-invalid");
    const fieldsets = $$("#scorers > fieldset.scorer");
    for (const li of $$("#evaluator-errors li")) {
      const m = /^scorers\[(\d+)\]\.?(.*)$/.exec(li.dataset.path || "");
      const fs = m && fieldsets[Number(m[1])];
      if (!fs) continue;
      const input = $$("[data-path]", fs).find((el) => el.dataset.path === m[2])
        || $$("[data-path]", fs).find((el) => m[2].startsWith(el.dataset.path));
      const slot = input ? $(`#${CSS.escape(input.id)}-err`) : null;
      if (input) input.setAttribute("aria-invalid", "true");
      if (slot) slot.textContent = li.textContent.replace(/^\S+:\s*/, "");
    }
  }

  function addScorer(type) {
    const tpl = $(`#tpl-${CSS.escape(type)}`);
    const n = ++scorerCount;
    const holder = document.createElement("div");
    holder.innerHTML = tpl.innerHTML.replaceAll("__N__", String(n));
    const fs = holder.firstElementChild;
    const name = $$("[data-path]", fs).find((el) => el.dataset.path === "name");
    if (name) name.value = `${type}-${n}`;
    $("#scorers").appendChild(fs);
    refreshJson();
    const first = $$("[data-path]", fs).find((el) => el.required) || name;
    if (first) first.focus();
  }

  document.addEventListener("click", (ev) => {
    const add = ev.target.closest("[data-add-scorer]");
    if (add) { addScorer(add.dataset.addScorer); return; }
    const remove = ev.target.closest("[data-remove-scorer]");
    if (remove) { remove.closest("fieldset.scorer").remove(); refreshJson(); }
  });
  document.addEventListener("input", (ev) => { if (ev.target.closest("#scorers")) refreshJson(); });
  document.addEventListener("change", (ev) => {
    if (ev.target.closest("#scorers")) refreshJson();
    if (ev.target.name === "evaluator_source" || ev.target.name === "resources") toggles();
  });
  document.body.addEventListener("htmx:afterSwap", (ev) => {
    if (ev.detail.target.id === "evaluator-check") markErrors();
  });

  // Show the inputs of the chosen option only; hidden inputs are disabled, so not sent.
  function toggles() {
    const source = $("input[name=evaluator_source]:checked");
    if (source) {
      const built = source.value === "built";
      $("#builder").hidden = !built;
      $("#stored-evaluator").hidden = built;
      $("#f-evaluator").disabled = built;
    }
    const res = $("input[name=resources]:checked");
    if (res) {
      for (const el of $$("[data-resources]")) {
        const on = el.dataset.resources === res.value;
        el.hidden = !on;
        for (const input of $$("input, select", el)) input.disabled = !on;
      }
    }
  }

  // ---- A job's live curves ----------------------------------------------------------------
  const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
  const curves = {};  // metric -> {steps, values, plot}; window.tlmCurves for tests
  window.tlmCurves = curves;

  function drawPoint(box, metric, step, value) {
    let c = curves[metric];
    if (!c) {
      const el = document.createElement("figure");
      el.className = "curve";
      el.id = `curve-${metric}`;
      el.setAttribute("aria-label", `${metric} by step`);
      box.appendChild(el);
      c = curves[metric] = { steps: [], values: [], el };
      c.plot = new uPlot({
        title: metric, width: Math.max(240, el.clientWidth || box.clientWidth), height: 220,
        scales: { x: { time: false } },
        axes: [{ incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000] }, {}],
        series: [{ label: "step" }, { label: metric, stroke: "#2563eb", width: 2 }],
      }, [[], []], el);
    }
    c.steps.push(step);
    c.values.push(value);
    c.plot.setData([c.steps, c.values]);
  }

  function logLine(text) {
    const li = document.createElement("li");
    li.textContent = text;
    $("#job-log").appendChild(li);
  }

  // The trainer logs a few completions per logged step as "samples at step N: [JSON]".
  const SAMPLES = /^samples at step (\d+): (\[.*\])$/s;

  function showSamples(step, samples) {
    const table = $("#samples");
    $("#samples-step").textContent = `step ${step}`;
    const body = table.tBodies[0];
    body.replaceChildren(...samples.map((s) => {
      const row = body.insertRow();
      for (const value of [s.prompt, s.completion, s.status, s.reward]) {
        const pre = document.createElement("pre");
        pre.textContent = typeof value === "string" ? value : JSON.stringify(value);
        row.insertCell().appendChild(pre);
      }
      return row;
    }));
    table.closest("section").hidden = false;
  }

  function refreshSummary(box) {
    htmx.ajax("GET", box.dataset.summary, { target: "#job-summary", swap: "outerHTML" });
  }

  function watchJob(box) {
    const first = box.dataset.first.split(",");
    const status = $("#curves-status");
    const source = new EventSource(box.dataset.events);
    source.addEventListener("metrics", (ev) => {
      const m = JSON.parse(ev.data);
      for (const metric of first) {
        if (metric in m.values) drawPoint(box, metric, m.step, m.values[metric]);
      }
      $("#job-step").textContent = m.step;
      status.textContent = `Step ${m.step}`;
    });
    source.addEventListener("state", (ev) => {
      const s = JSON.parse(ev.data);
      const el = $("#job-state");
      el.textContent = s.state;
      el.className = `state state-${s.state.toLowerCase()}`;
      logLine(`${s.state}${s.message ? `: ${s.message}` : ""}`);
      if (TERMINAL.has(s.state)) refreshSummary(box);
    });
    source.addEventListener("checkpoint", (ev) => logLine(`checkpoint at step ${JSON.parse(ev.data).step}`));
    source.addEventListener("log", (ev) => {
      const message = JSON.parse(ev.data).message;
      const samples = SAMPLES.exec(message);
      if (samples) showSamples(Number(samples[1]), JSON.parse(samples[2]));
      else logLine(message);
    });
    source.addEventListener("result", () => refreshSummary(box));
    source.addEventListener("failure", (ev) => { status.textContent = JSON.parse(ev.data).message; source.close(); });
    source.addEventListener("end", () => {
      source.close();
      status.textContent = Object.keys(curves).length ? "Finished." : "Finished; no metrics were logged.";
      document.body.dataset.jobDone = "true";
      refreshSummary(box);
    });
    window.addEventListener("resize", () => {
      for (const c of Object.values(curves)) c.plot.setSize({ width: c.el.clientWidth, height: 220 });
    });
  }

  function init() {
    toggles();
    if ($("#scorers")) refreshJson();
    const box = $("#curves");
    if (box && !box.dataset.watching) { box.dataset.watching = "true"; watchJob(box); }
  }
  document.addEventListener("DOMContentLoaded", init);
  document.body.addEventListener("htmx:afterSettle", (ev) => { if (ev.detail.target.id === "main") init(); });
})();
