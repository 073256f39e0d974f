// The workbench's set-up panel: prompts, token preview, answer pickers, site, direction, Run, and
// the session's history of runs. It only reads and writes the traits of
// nnpatch.workbench._Controls; tokenizing, checking and running all happen in Python. Render
// returns a clean-up that removes every listener it added.

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

function prob(x) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(3) : "–";
}

// Keys pressed inside the app stay in the app: JupyterLab listens for its shortcuts (Shift+Enter
// runs the cell, D D deletes it) on the notebook, above this element. Ctrl/Cmd+S still saves.
// Ctrl/Cmd+Enter and Shift+Enter, the notebook's "run" keys, run the app instead.
function keepKeys(root, onSubmit) {
  const listener = (event) => {
    const mod = event.ctrlKey || event.metaKey;
    if ((mod || event.shiftKey) && event.key === "Enter" && onSubmit) {
      event.preventDefault();
      onSubmit();
    }
    if (!(mod && event.key.toLowerCase() === "s")) event.stopPropagation();
  };
  root.addEventListener("keydown", listener);
  return () => root.removeEventListener("keydown", listener);
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
  const act = (name, extra = {}) => {
    model.set("action", { name, seq: Date.now(), ...extra });
    model.save_changes();
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

  // JupyterLab's theme decides the figures' colours: Python draws a dark heatmap for a dark theme.
  const syncTheme = () => {
    const theme = document.body.dataset.jpThemeLight === "false" ? "dark" : "light";
    if (model.get("theme") !== theme) { model.set("theme", theme); model.save_changes(); }
  };
  syncTheme();
  const themeWatch = new MutationObserver(syncTheme);
  themeWatch.observe(document.body, { attributes: true, attributeFilter: ["data-jp-theme-light"] });
  cleanups.push(() => themeWatch.disconnect());

  // -- pairs ----------------------------------------------------------------------------------
  const pairSelect = h("select", { class: "nnp-pair", "data-testid": "pair-picker",
                                   title: "a ready-made experiment; \"all pairs (mean)\" sweeps every pair and shows the mean" });
  const allPairsHint = h("span", { class: "nnp-hint nnp-all-pairs-hint", "data-testid": "all-pairs-hint" });
  const pairRow = h("div", { class: "nnp-row" }, h("label", {}, "Example"), pairSelect, allPairsHint);
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
      pairs.length ? h("option", { value: "-2", class: "nnp-all-pairs" }, `all ${pairs.length} pairs (mean)`) : null,
      ...pairs.map((label, i) => h("option", { value: String(i) }, label)),
    );
    pairSelect.value = String(model.get("pair"));
    allPairsHint.textContent = model.get("pair") === -2
      ? `every pair runs, each with its own answer and wrong token; the fields below show pair 1` : "";
  });

  // -- prompts ----------------------------------------------------------------------------------
  const prompt = (name, label, hint) => {
    const area = h("textarea", { class: `nnp-prompt nnp-${name}`, rows: 2, spellcheck: false, title: hint,
                                 placeholder: `${label} prompt`, "data-testid": `${name}-prompt` });
    area.addEventListener("input", () => {
      if (model.get("pair") !== -1) write("pair", -1);
      write(name, area.value, 250);
    });
    on(name, () => {
      if (area.value !== model.get(name) && !timers.has(name)) area.value = model.get(name);
    });
    return [area, h("div", { class: "nnp-row" }, h("label", {}, label), area)];
  };
  const [cleanArea, cleanRow] = prompt("clean", "Clean", "the prompt whose answer you want to explain (Ctrl+Enter or Shift+Enter runs)");
  const [corruptArea, corruptRow] = prompt("corrupt", "Corrupt",
    "the same prompt with the detail that changes the answer, token for token (Ctrl+Enter or Shift+Enter runs)");

  // -- token preview ----------------------------------------------------------------------------
  const tokens = h("div", { class: "nnp-tokens", title: "the prompts' tokens by position; differences are highlighted" });
  const warning = h("div", { class: "nnp-warning nnp-token-warning", "data-testid": "token-warning" });
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
    const input = h("input", { class: `nnp-pick nnp-${name}`, list: listId, spellcheck: false, title: hint,
                               "data-testid": name });
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
    "the token the clean prompt should predict (one token; the list shows the clean run's top predictions)");
  const [wrongInput, wrongField] = picker("wrong", "Wrong", "wrong_options",
    "the token the corrupt prompt should predict (one token; the list shows the corrupt run's top predictions)");
  const answerWarning = h("div", { class: "nnp-warning nnp-answer-warning", "data-testid": "answer-warning" });
  on("warning", () => {
    answerWarning.textContent = model.get("warning");
    answerWarning.hidden = !model.get("warning");
  });

  // -- granularity, site, metric, direction -----------------------------------------------------
  const choice = (name, options, label, hint) => {
    const select = h("select", { class: `nnp-${name}`, title: hint, "data-testid": name });
    select.addEventListener("change", () => write(name, select.value));
    on(`${typeof options === "string" ? options + " " : ""}${name}`, () => {
      const list = typeof options === "string" ? model.get(options) : options();
      select.replaceChildren(...list.map((o) => h("option", { value: o }, o)));
      select.value = model.get(name);
    });
    return h("span", { class: "nnp-field", title: hint }, h("label", {}, label), select);
  };
  const directionHint = h("span", { class: "nnp-hint nnp-direction-hint", "data-testid": "direction-hint" });
  on("direction directions", () => {
    directionHint.textContent = model.get("directions")[model.get("direction")] || "";
  });

  // -- run ----------------------------------------------------------------------------------------
  const runButton = h("button", { class: "nnp-run", type: "button", "data-testid": "run",
                                  title: "sweep every cell with these settings (Ctrl+Enter)" }, "Run");
  const progress = h("progress", { class: "nnp-progress", max: "1", title: "patched runs done" });
  const summary = h("span", { class: "nnp-summary", "data-testid": "summary" });
  const staleBanner = h("span", { class: "nnp-stale-banner", "data-testid": "stale-banner",
                                  title: "the heatmap and the numbers below belong to the last run's inputs" },
                        "inputs changed: Run");
  const run = () => {
    // What is in the fields now is what runs, even if the user has not paused typing.
    for (const [name, input] of [["clean", cleanArea], ["corrupt", corruptArea],
                                 ["answer", answerInput], ["wrong", wrongInput]]) {
      clearTimeout(timers.get(name));
      timers.delete(name);
      if (model.get(name) !== input.value) {
        model.set(name, input.value);
        if ((name === "clean" || name === "corrupt") && model.get("pair") !== -1) model.set("pair", -1);
      }
    }
    act("run");
  };
  runButton.addEventListener("click", run);
  cleanups.push(keepKeys(root, () => { if (!runButton.disabled) run(); }));
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
  on("stale", () => {
    staleBanner.hidden = !model.get("stale");
    root.classList.toggle("nnp-is-stale", model.get("stale"));
  });
  on("summary", () => {
    const s = model.get("summary");
    if (!s.metric) { summary.replaceChildren(); return; }
    const score = (label, key) => h("span", { class: `nnp-score nnp-${key}`, "data-value": String(s[key]) },
                                    `${label} ${number(s[key])}`);
    const probs = s.probs || {};
    const p = (token, name) => {
      const runs = probs[name] || {};
      return h("span", { class: `nnp-probs nnp-p-${name}`, title: `p(${name}) in the unpatched clean and corrupt runs` +
                         (s.pairs > 1 ? `, mean over ${s.pairs} pairs (each with its own ${name})` : "") },
        `p(${s.pairs > 1 ? name : JSON.stringify(token)}) `,
        ...["clean", "corrupt"].flatMap((r, i) => [i ? " / " : "",
          h("span", { class: `nnp-prob nnp-p-${name}-${r}`, "data-value": String(runs[r]), title: `${r} run` }, prob(runs[r]))]));
    };
    summary.replaceChildren(`${s.cells} cells${s.pairs > 1 ? ` × ${s.pairs} pairs` : ""} in ${s.seconds.toFixed(2)} s · ${s.metric}: `,
                            score("clean", "clean_score"), " · ", score("corrupt", "corrupt_score"), " · ",
                            p(s.answer, "answer"), " · ", p(s.wrong, "wrong"));
  });

  // -- history ------------------------------------------------------------------------------------
  const back = h("button", { type: "button", class: "nnp-back", "data-testid": "history-back", title: "show the previous run (its inputs come back)" }, "◀");
  const forward = h("button", { type: "button", class: "nnp-forward", "data-testid": "history-forward", title: "show the next run" }, "▶");
  const where = h("span", { class: "nnp-hint nnp-history-position", "data-testid": "history-position" });
  const compareWith = h("select", { class: "nnp-compare-with", "data-testid": "compare-with", title: "the run to show beside this one" });
  const compare = h("button", { type: "button", class: "nnp-compare", "data-testid": "history-compare",
                                title: "show this run and the chosen one side by side, on one colour scale" }, "Compare");
  const perPair = h("button", { type: "button", class: "nnp-per-pair", "data-testid": "per-pair",
                                title: "one small heatmap per pair of this run over all pairs" }, "Per pair");
  const hide = h("button", { type: "button", class: "nnp-hide-extra", "data-testid": "hide-extra", title: "hide the comparison" }, "Hide");
  back.addEventListener("click", () => act("back"));
  forward.addEventListener("click", () => act("forward"));
  compare.addEventListener("click", () => act("compare", { other: Number(compareWith.value) }));
  perPair.addEventListener("click", () => act("per_pair"));
  hide.addEventListener("click", () => act("hide_extra"));
  const historyRow = h("div", { class: "nnp-row nnp-history" }, h("label", {}, "Runs"), back, forward, where,
                       compareWith, compare, perPair, hide);
  on("history", () => {
    const hist = model.get("history");
    const runs = hist.runs || [], i = hist.index ?? -1;
    historyRow.hidden = runs.length === 0;
    back.disabled = i <= 0;
    forward.disabled = i >= runs.length - 1;
    where.textContent = runs.length ? `${runs[i]} (${i + 1} of ${runs.length})` : "";
    const others = runs.map((label, k) => [label, k]).filter(([, k]) => k !== i).reverse();
    compareWith.replaceChildren(...others.map(([label, k]) => h("option", { value: String(k) }, label)));
    if (i > 0) compareWith.value = String(i - 1);
    compareWith.hidden = compare.hidden = others.length === 0;
    perPair.hidden = !hist.per_pair;
    hide.hidden = !hist.extra;
  });

  const message = h("div", { class: "nnp-message", role: "alert", "data-testid": "message" });
  on("message", () => {
    message.textContent = model.get("message");
    message.hidden = !model.get("message");
  });

  root.append(
    pairRow, cleanRow, corruptRow,
    h("div", { class: "nnp-row" }, h("label", {}, "Tokens"), h("div", { class: "nnp-grow" }, tokens, warning)),
    h("div", { class: "nnp-row nnp-settings" },
      answerField, wrongField,
      choice("granularity", "granularities", "Cells", "what one heatmap cell patches: a layer at one position, one head (all positions), or one head at one position"),
      choice("site", "sites", "Site", "where in each layer the activation is patched (a module path of the model)"),
      choice("metric", "metrics", "Metric", "what is measured on the last position's logits; logit_diff is normalised: corrupt 0, clean 1")),
    h("div", { class: "nnp-row nnp-settings" },
      choice("direction", () => Object.keys(model.get("directions")), "Direction",
             "denoise: clean activations into the corrupt run (what restores the answer); noise: corrupt into clean (what breaks it)"),
      directionHint),
    answerWarning,
    h("div", { class: "nnp-row nnp-actions" }, runButton, progress, staleBanner, summary),
    historyRow,
    message,
  );
  return () => cleanups.forEach((undo) => undo());
}

export default { render };
