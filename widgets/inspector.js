// The heatmap's companion: the inspected cell, the selection and its combined patch, the code.
// It only reads and writes the traits of nnpatch.workbench._Inspector; every number comes from
// Python. Render returns a clean-up that removes every listener it added.

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-") || key === "for") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function number(x) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(4) : "–";
}

// One number with its full value kept in data-value, so a test can read what Python sent.
function value(key, x) {
  return h("td", { class: `nnp-num nnp-${key}`, "data-value": String(x) }, number(x));
}

// The scores and the top-k next tokens of the clean, corrupt and patched runs.
function outcomeView(o) {
  const scores = h("table", { class: "nnp-scores", title: "the metric of each run; normalized: 0 is the corrupt run, 1 the clean run" },
    h("tr", {}, h("th", {}, ""), h("th", {}, "clean"), h("th", {}, "corrupt"), h("th", {}, "patched"),
      h("th", {}, "normalized"), o.heatmap_value === null ? "" : h("th", {}, "heatmap")),
    h("tr", {}, h("th", {}, o.metric), value("clean_score", o.clean_score), value("corrupt_score", o.corrupt_score),
      value("patched_score", o.patched_score), value("normalized", o.normalized),
      o.heatmap_value === null ? "" : value("heatmap_value", o.heatmap_value)));
  const runs = ["clean", "corrupt", "patched"];
  const mean = o.pairs > 1 ? ` (mean over ${o.pairs} pairs, each with its own tokens)` : "";
  const probRow = (name, token) => h("tr", { "data-token": name },
    h("th", {}, o.pairs > 1 ? `p(${name})` : `p(${JSON.stringify(token)})`),
    ...runs.map((r) => h("td", { class: `nnp-num nnp-prob nnp-p-${name}-${r}`, "data-value": String(o.probs[r][name]) },
                          typeof o.probs[r][name] === "number" ? o.probs[r][name].toFixed(3) : "–")));
  const probs = h("table", { class: "nnp-probs-table", "data-testid": "probs", title: `the answer's and the wrong token's probability in each run${mean}` },
    h("tr", {}, h("th", {}, ""), ...runs.map((r) => h("th", {}, r))),
    probRow("answer", o.answer), probRow("wrong", o.wrong));
  const k = Math.max(...runs.map((r) => o.top[r].length));
  const tokenCell = (run, i) => {
    const entry = o.top[run][i];
    if (!entry) return [h("td"), h("td")];
    const [tok, p] = entry;
    const cls = tok === o.answer ? "nnp-tok nnp-answer" : tok === o.wrong ? "nnp-tok nnp-wrong" : "nnp-tok";
    return [h("td", { class: cls }, tok), h("td", { class: "nnp-num", "data-value": String(p) }, p.toFixed(3))];
  };
  const top = h("table", { class: "nnp-topk", title: `the most likely next tokens of each run${mean}` },
    h("tr", {}, h("th", {}, "#"), ...runs.map((r) => h("th", { colSpan: 2 }, `${r} top-${k}${o.pairs > 1 ? " (mean p)" : ""}`))),
    ...Array.from({ length: k }, (_, i) =>
      h("tr", { "data-rank": String(i) }, h("th", {}, String(i + 1)), ...runs.flatMap((r) => tokenCell(r, i)))));
  return [scores, probs, top];
}

// Keys pressed inside the app stay in the app (JupyterLab's notebook shortcuts listen above it).
function keepKeys(root) {
  const listener = (event) => {
    const mod = event.ctrlKey || event.metaKey;
    if (!(mod && event.key.toLowerCase() === "s")) event.stopPropagation();
  };
  root.addEventListener("keydown", listener);
  return () => root.removeEventListener("keydown", listener);
}

function render({ model, el }) {
  const root = h("div", { class: "nnp nnp-inspector" });
  el.append(root);
  const cleanups = [];
  const on = (names, fn) => {
    for (const name of names.split(" ")) {
      model.on(`change:${name}`, fn);
      cleanups.push(() => model.off(`change:${name}`, fn));
    }
    fn();
  };
  const act = (name, extra = {}) => {
    model.set("action", { name, seq: Date.now(), ...extra });
    model.save_changes();
  };
  const sameCell = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
  cleanups.push(keepKeys(root));

  // The heatmap beside this panel is as wide as the room the page gives it: the page measures the
  // heatmap's box and the row, and Python sets the figures' widths (plotly's own autosize does not
  // see a box that changes size without a window resize).
  let timer = 0;
  const watched = new Set();
  const measure = () => {
    const row = el.parentElement, plot = el.previousElementSibling;
    if (!row || !plot) return;
    const width = (node) => Math.round(node.getBoundingClientRect().width);
    const [plotWidth, rowWidth] = [width(plot), width(row)];
    if (plotWidth > 0 && (plotWidth !== model.get("plot_width") || rowWidth !== model.get("row_width"))) {
      model.set("plot_width", plotWidth);
      model.set("row_width", rowWidth);
      model.save_changes();
    }
  };
  const resized = new ResizeObserver(() => {
    for (const node of [el.parentElement, el.previousElementSibling]) {
      if (node && !watched.has(node)) { watched.add(node); resized.observe(node); }
    }
    clearTimeout(timer);
    timer = setTimeout(measure, 100);
  });
  resized.observe(el);
  cleanups.push(() => { resized.disconnect(); clearTimeout(timer); });

  // -- what a click on the heatmap does -------------------------------------------------------
  const modes = h("span", { class: "nnp-modes" });
  on("click_mode", () => {
    modes.replaceChildren("Click a cell to ", ...["inspect", "select"].map((mode) => {
      const button = h("button", { type: "button", class: `nnp-mode nnp-mode-${mode}`, "data-testid": `mode-${mode}`,
                                   title: mode === "inspect" ? "a click patches that cell alone and shows what it does"
                                                             : "a click adds the cell to the selection, or takes it out" }, mode);
      button.classList.toggle("nnp-on", model.get("click_mode") === mode);
      button.addEventListener("click", () => { model.set("click_mode", mode); model.save_changes(); });
      return button;
    }), h("span", { class: "nnp-hint" }, " (shift-click always selects)"));
  });

  // -- the inspected cell ---------------------------------------------------------------------
  const detail = h("section", { class: "nnp-detail", "data-testid": "detail" });
  on("detail selection", () => {
    const d = model.get("detail");
    if (!d.cells) { detail.replaceChildren(); return; }
    const cell = d.cells[0];
    const selected = model.get("selection").some((s) => sameCell(s.cell, cell));
    const toggle = h("button", { type: "button", class: "nnp-toggle", title: "add this cell to the cells patched together, or take it out" },
                     selected ? "Unselect" : "Select");
    toggle.addEventListener("click", () => act("toggle", { cell }));
    detail.replaceChildren(
      h("h4", { class: "nnp-title", "data-cell": JSON.stringify(cell) }, `Patched alone: ${d.label} `, toggle),
      ...outcomeView(d));
  });

  // -- the selection ----------------------------------------------------------------------------
  const chips = h("span", { class: "nnp-chips" });
  const patchButton = h("button", { type: "button", class: "nnp-patch", "data-testid": "patch-selected",
                                    title: "patch every selected cell together, in one run" }, "Patch selected");
  const clearButton = h("button", { type: "button", class: "nnp-clear", "data-testid": "clear-selection", title: "unselect every cell" }, "Clear");
  patchButton.addEventListener("click", () => act("patch"));
  clearButton.addEventListener("click", () => act("clear"));
  on("selection", () => {
    const selection = model.get("selection");
    chips.replaceChildren(...selection.map(({ cell, label }) => {
      const remove = h("button", { type: "button", class: "nnp-remove", title: "unselect" }, "×");
      remove.addEventListener("click", () => act("toggle", { cell }));
      return h("span", { class: "nnp-chip", "data-cell": JSON.stringify(cell) }, label, remove);
    }));
    if (!selection.length) chips.append(h("span", { class: "nnp-hint" }, "no cells selected"));
    patchButton.disabled = clearButton.disabled = !selection.length;
  });
  const combined = h("section", { class: "nnp-combined" });
  on("combined", () => {
    const c = model.get("combined");
    combined.replaceChildren(...(c.cells ? [h("h4", { class: "nnp-title" }, `Patched together: ${c.label}`), ...outcomeView(c)] : []));
  });

  // -- code -------------------------------------------------------------------------------------
  const codeButton = h("button", { type: "button", class: "nnp-show-code", "data-testid": "show-code",
                                   title: "plain Python on nnpatch's API that recomputes every number shown" }, "Show code");
  const copyButton = h("button", { type: "button", class: "nnp-copy", "data-testid": "copy", title: "copy the code" }, "Copy");
  const feedback = h("span", { class: "nnp-hint nnp-copy-feedback", "data-testid": "copy-feedback", role: "status" });
  const code = h("pre", { class: "nnp-code", "data-testid": "code" });
  // Where the clipboard API is missing (plain http, old browsers), the code is selected in a
  // text area for the user's own Ctrl+C.
  const fallback = h("textarea", { class: "nnp-copy-fallback", readOnly: true, rows: 6, hidden: true,
                                   title: "select and copy (Ctrl+C)" });
  codeButton.addEventListener("click", () => act("code"));
  let feedbackTimer = 0;
  const say = (text) => {
    feedback.textContent = text;
    clearTimeout(feedbackTimer);
    if (text === "copied") feedbackTimer = setTimeout(() => { feedback.textContent = ""; }, 3000);
  };
  cleanups.push(() => clearTimeout(feedbackTimer));
  copyButton.addEventListener("click", async () => {
    const text = model.get("code");
    fallback.hidden = true;
    try {
      if (!navigator.clipboard || !navigator.clipboard.writeText) throw new Error("no clipboard API");
      await navigator.clipboard.writeText(text);
      say("copied");
    } catch (err) {
      fallback.value = text;
      fallback.hidden = false;
      fallback.focus();
      fallback.select();
      let copied = false;
      try { copied = document.execCommand("copy"); } catch (e) { copied = false; }
      if (copied) { fallback.hidden = true; say("copied"); } else say("select and copy: clipboard not available");
    }
  });
  on("code", () => {
    code.textContent = model.get("code");
    code.hidden = copyButton.hidden = !model.get("code");
    fallback.hidden = true;
    say("");
  });

  const message = h("div", { class: "nnp-message", role: "alert", "data-testid": "inspector-message" });
  on("message", () => {
    message.textContent = model.get("message");
    message.hidden = !model.get("message");
  });

  const body = h("div", {},
    h("div", { class: "nnp-row" }, modes),
    detail,
    h("div", { class: "nnp-row nnp-selection" }, h("label", {}, "Selected"), chips, patchButton, clearButton),
    combined,
    h("div", { class: "nnp-row" }, codeButton, copyButton, feedback),
    fallback,
    code);
  const placeholder = h("div", { class: "nnp-hint" }, "Run to see the heatmap; then click its cells.");
  const stale = h("div", { class: "nnp-stale-banner", "data-testid": "inspector-stale-banner",
                           title: "these numbers belong to the last run's inputs; clicks on the heatmap wait for a new Run" },
                  "inputs changed: Run");
  on("ready busy stale", () => {
    body.hidden = !model.get("ready");
    placeholder.hidden = model.get("ready");
    stale.hidden = !(model.get("ready") && model.get("stale"));
    root.classList.toggle("nnp-busy", model.get("busy"));
    body.classList.toggle("nnp-stale", model.get("stale"));
  });
  root.append(placeholder, stale, body, message);
  return () => cleanups.forEach((undo) => undo());
}

export default { render };
