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
  const scores = h("table", { class: "nnp-scores" },
    h("tr", {}, h("th", {}, ""), h("th", {}, "clean"), h("th", {}, "corrupt"), h("th", {}, "patched"),
      h("th", {}, "normalized"), o.heatmap_value === null ? "" : h("th", {}, "heatmap")),
    h("tr", {}, h("th", {}, o.metric), value("clean_score", o.clean_score), value("corrupt_score", o.corrupt_score),
      value("patched_score", o.patched_score), value("normalized", o.normalized),
      o.heatmap_value === null ? "" : value("heatmap_value", o.heatmap_value)));
  const runs = ["clean", "corrupt", "patched"];
  const k = Math.max(...runs.map((r) => o.top[r].length));
  const tokenCell = (run, i) => {
    const entry = o.top[run][i];
    if (!entry) return [h("td"), h("td")];
    const [tok, p] = entry;
    const cls = tok === o.answer ? "nnp-tok nnp-answer" : tok === o.wrong ? "nnp-tok nnp-wrong" : "nnp-tok";
    return [h("td", { class: cls }, tok), h("td", { class: "nnp-num", "data-value": String(p) }, p.toFixed(3))];
  };
  const top = h("table", { class: "nnp-topk" },
    h("tr", {}, h("th", {}, "#"), ...runs.map((r) => h("th", { colSpan: 2 }, `${r} top-${k}`))),
    ...Array.from({ length: k }, (_, i) =>
      h("tr", { "data-rank": String(i) }, h("th", {}, String(i + 1)), ...runs.flatMap((r) => tokenCell(r, i)))));
  return [scores, top];
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

  // -- what a click on the heatmap does -------------------------------------------------------
  const modes = h("span", { class: "nnp-modes" });
  on("click_mode", () => {
    modes.replaceChildren("Click a cell to ", ...["inspect", "select"].map((mode) => {
      const button = h("button", { type: "button", class: `nnp-mode nnp-mode-${mode}` }, mode);
      button.classList.toggle("nnp-on", model.get("click_mode") === mode);
      button.addEventListener("click", () => { model.set("click_mode", mode); model.save_changes(); });
      return button;
    }), h("span", { class: "nnp-hint" }, " (shift-click always selects)"));
  });

  // -- the inspected cell ---------------------------------------------------------------------
  const detail = h("section", { class: "nnp-detail" });
  on("detail selection", () => {
    const d = model.get("detail");
    if (!d.cells) { detail.replaceChildren(); return; }
    const cell = d.cells[0];
    const selected = model.get("selection").some((s) => sameCell(s.cell, cell));
    const toggle = h("button", { type: "button", class: "nnp-toggle" }, selected ? "Unselect" : "Select");
    toggle.addEventListener("click", () => act("toggle", { cell }));
    detail.replaceChildren(
      h("h4", { class: "nnp-title", "data-cell": JSON.stringify(cell) }, `Patched alone: ${d.label} `, toggle),
      ...outcomeView(d));
  });

  // -- the selection ----------------------------------------------------------------------------
  const chips = h("span", { class: "nnp-chips" });
  const patchButton = h("button", { type: "button", class: "nnp-patch" }, "Patch selected");
  const clearButton = h("button", { type: "button", class: "nnp-clear" }, "Clear");
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
  const codeButton = h("button", { type: "button", class: "nnp-show-code" }, "Show code");
  const copyButton = h("button", { type: "button", class: "nnp-copy" }, "Copy");
  const code = h("pre", { class: "nnp-code" });
  codeButton.addEventListener("click", () => act("code"));
  copyButton.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(model.get("code")));
  on("code", () => {
    code.textContent = model.get("code");
    code.hidden = copyButton.hidden = !model.get("code");
  });

  const message = h("div", { class: "nnp-message", role: "alert" });
  on("message", () => {
    message.textContent = model.get("message");
    message.hidden = !model.get("message");
  });

  const body = h("div", {},
    h("div", { class: "nnp-row" }, modes),
    detail,
    h("div", { class: "nnp-row nnp-selection" }, h("label", {}, "Selected"), chips, patchButton, clearButton),
    combined,
    h("div", { class: "nnp-row" }, codeButton, copyButton),
    code);
  const placeholder = h("div", { class: "nnp-hint" }, "Run to see the heatmap; then click its cells.");
  on("ready busy", () => {
    body.hidden = !model.get("ready");
    placeholder.hidden = model.get("ready");
    root.classList.toggle("nnp-busy", model.get("busy"));
  });
  root.append(placeholder, body, message);
  return () => cleanups.forEach((undo) => undo());
}

export default { render };
