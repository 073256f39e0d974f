// The workbench's set-up panel: prompts, token preview, answer pickers, site, Run.
// It only reads and writes the traits of nnpatch.workbench._Controls; tokenizing, checking and
// running all happen in Python. Render returns a clean-up that removes every listener it added.

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-") || key === "list" || key === "for") node.setAttribute(key, value);
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

function render({ model, el }) {
  const root = h("div", { class: "nnp nnp-controls" });
  el.append(root);
  const uid = Math.random().toString(36).slice(2);
  const cleanups = [];
  const on = (names, fn) => {
    for (const name of names.split(" ")) {
      model.on(`change:${name}`, fn);
      cleanups.push(() => model.off(`change:${name}`, fn));
    }
    fn();
  };

  // Text fields write their trait a moment after the user stops typing, and at once on Run.
  const timers = new Map();
  const write = (name, value, delay) => {
    clearTimeout(timers.get(name));
    const commit = () => {
      timers.delete(name);
      if (model.get(name) !== value) {
        model.set(name, value);
        model.save_changes();
      }
    };
    if (delay) timers.set(name, setTimeout(commit, delay));
    else commit();
  };
  cleanups.push(() => timers.forEach((id) => clearTimeout(id)));

  // -- pairs ----------------------------------------------------------------------------------
  const pairSelect = h("select", { class: "nnp-pair" });
  const pairRow = h("div", { class: "nnp-row" }, h("label", {}, "Example"), pairSelect);
  pairSelect.addEventListener("change", () => {
    // An example replaces every field: edits still waiting to be written would undo it.
    timers.forEach((id) => clearTimeout(id));
    timers.clear();
    write("pair", Number(pairSelect.value));
  });
  on("pairs pair", () => {
    const pairs = model.get("pairs");
    pairRow.hidden = pairs.length === 0;
    pairSelect.replaceChildren(
      h("option", { value: "-1" }, "your own prompts"),
      ...pairs.map((label, i) => h("option", { value: String(i) }, label)),
    );
    pairSelect.value = String(model.get("pair"));
  });

  // -- prompts ----------------------------------------------------------------------------------
  const prompt = (name, label) => {
    const area = h("textarea", { class: `nnp-prompt nnp-${name}`, rows: 2, spellcheck: false,
                                 placeholder: `${label} prompt` });
    area.addEventListener("input", () => {
      if (model.get("pair") !== -1) write("pair", -1);
      write(name, area.value, 250);
    });
    on(name, () => {
      if (area.value !== model.get(name) && !timers.has(name)) area.value = model.get(name);
    });
    return [area, h("div", { class: "nnp-row" }, h("label", {}, label), area)];
  };
  const [cleanArea, cleanRow] = prompt("clean", "Clean");
  const [corruptArea, corruptRow] = prompt("corrupt", "Corrupt");

  // -- token preview ----------------------------------------------------------------------------
  const tokens = h("div", { class: "nnp-tokens" });
  const warning = h("div", { class: "nnp-warning" });
  on("preview", () => {
    const p = model.get("preview");
    const clean = p.clean || [], corrupt = p.corrupt || [];
    const differ = new Set(p.differ || []);
    const n = Math.max(clean.length, corrupt.length);
    const cell = (tok, pos, other) => {
      if (!tok) return h("td", { class: "nnp-missing" }, "");
      let cls = "nnp-tok";
      let title = `position ${pos}`;
      if (tok.unknown) { cls += " nnp-unknown"; title += `: ${JSON.stringify(tok.source)} is not in the vocabulary`; }
      else if (pos >= other.length) { cls += " nnp-extra"; title += ": the other prompt has no token here"; }
      else if (differ.has(pos)) cls += " nnp-differ";
      return h("td", { class: cls, title }, tok.text);
    };
    const head = h("tr", {}, h("th", {}, "pos"),
                   ...Array.from({ length: n }, (_, i) => h("th", {}, String(i))));
    const row = (label, own, other) =>
      h("tr", { "data-prompt": label }, h("th", {}, label), ...Array.from({ length: n }, (_, i) => cell(own[i], i, other)));
    tokens.replaceChildren(n ? h("table", {}, head, row("clean", clean, corrupt), row("corrupt", corrupt, clean)) : "");
    warning.textContent = p.warning || "";
    warning.hidden = !p.warning;
  });

  // -- answer and wrong token -------------------------------------------------------------------
  const picker = (name, label, optionsTrait, hint) => {
    const listId = `nnp-${name}-${uid}`;
    const input = h("input", { class: `nnp-pick nnp-${name}`, list: listId, spellcheck: false });
    const list = h("datalist", { id: listId });
    input.addEventListener("input", () => write(name, input.value, 250));
    on(name, () => {
      if (input.value !== model.get(name) && !timers.has(name)) input.value = model.get(name);
    });
    on(optionsTrait, () => {
      list.replaceChildren(...model.get(optionsTrait).map(
        ([tok, p]) => h("option", { value: tok, label: `${JSON.stringify(tok)}  p=${p.toFixed(3)}` })));
    });
    return [input, h("span", { class: "nnp-field", title: hint }, h("label", {}, label), input, list)];
  };
  const [answerInput, answerField] = picker("answer", "Answer", "answer_options",
                                            "the token the clean prompt should predict");
  const [wrongInput, wrongField] = picker("wrong", "Wrong", "wrong_options",
                                          "the token the corrupt prompt should predict");

  // -- granularity, site, metric --------------------------------------------------------------
  const choice = (name, optionsTrait, label) => {
    const select = h("select", { class: `nnp-${name}` });
    select.addEventListener("change", () => write(name, select.value));
    on(`${optionsTrait} ${name}`, () => {
      select.replaceChildren(...model.get(optionsTrait).map((o) => h("option", { value: o }, o)));
      select.value = model.get(name);
    });
    return h("span", { class: "nnp-field" }, h("label", {}, label), select);
  };

  // -- run ----------------------------------------------------------------------------------------
  const runButton = h("button", { class: "nnp-run", type: "button" }, "Run");
  const progress = h("progress", { class: "nnp-progress", max: "1" });
  const summary = h("span", { class: "nnp-summary" });
  runButton.addEventListener("click", () => {
    // What is in the fields now is what runs, even if the user has not paused typing.
    for (const [name, input] of [["clean", cleanArea], ["corrupt", corruptArea],
                                 ["answer", answerInput], ["wrong", wrongInput]]) {
      clearTimeout(timers.get(name));
      timers.delete(name);
      model.set(name, input.value);
    }
    model.set("action", { name: "run", seq: Date.now() });
    model.save_changes();
  });
  // Indeterminate until the sweep reports its first finished runs, then the fraction done.
  on("busy", () => {
    const busy = model.get("busy");
    runButton.disabled = busy;
    progress.hidden = !busy;
    if (busy) progress.removeAttribute("value");
    root.classList.toggle("nnp-busy", busy);
  });
  on("progress", () => {
    const done = model.get("progress");
    if (done > 0) progress.value = done;
    else progress.removeAttribute("value");
  });
  on("summary", () => {
    const s = model.get("summary");
    if (!s.metric) { summary.replaceChildren(); return; }
    const score = (label, key) => h("span", { class: `nnp-score nnp-${key}`, "data-value": String(s[key]) },
                                    `${label} ${number(s[key])}`);
    summary.replaceChildren(`${s.cells} cells in ${s.seconds.toFixed(2)} s · ${s.metric}: `,
                            score("clean", "clean_score"), " · ", score("corrupt", "corrupt_score"));
  });

  const message = h("div", { class: "nnp-message", role: "alert" });
  on("message", () => {
    message.textContent = model.get("message");
    message.hidden = !model.get("message");
  });

  root.append(
    pairRow, cleanRow, corruptRow,
    h("div", { class: "nnp-row" }, h("label", {}, "Tokens"), h("div", { class: "nnp-grow" }, tokens, warning)),
    h("div", { class: "nnp-row nnp-settings" },
      answerField, wrongField,
      choice("granularity", "granularities", "Cells"),
      choice("site", "sites", "Site"),
      choice("metric", "metrics", "Metric")),
    h("div", { class: "nnp-row nnp-actions" }, runButton, progress, summary),
    message,
  );
  return () => cleanups.forEach((undo) => undo());
}

export default { render };
