// saedynamics explorer: renders the index of latents and a latent's page from the data files
// (JSON wrapped in EXPLORER.receive(...), which a page opened from the file system may load).
"use strict";

const EXPLORER = (() => {
  const data = {};
  const SVG = "http://www.w3.org/2000/svg";

  function receive(doc) {
    data[doc.kind] = doc;
    const page = document.body.dataset.page;
    if (page === "index" && data.tokens && data.index) renderIndex(data.index);
    if (page === "latent" && data.tokens && doc.kind === "latent") renderLatent(doc);
  }

  // ---- helpers ------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "–";
    return Number(x).toPrecision(digits || 3);
  }

  function percent(x) {
    if (x === null || x === undefined) return "–";
    if (x === 0) return "0";
    return (100 * x).toPrecision(2) + "%";
  }

  // a token as shown: whitespace made visible, so that contexts read as text
  function display(id) {
    const s = data.tokens.tokens[id];
    if (s === undefined) return "<id " + id + ">";
    return s.replace(/\n/g, "↵").replace(/\t/g, "→");
  }

  // a token on its own: a token of only spaces shows them as ␣
  function tokenChip(id) {
    const s = display(id);
    const text = s.trim() === "" ? s.replace(/ /g, "␣") : s;
    return el("span", { class: "chip", text: text, title: "token " + id + ": " + JSON.stringify(data.tokens.tokens[id] || "") });
  }

  // ---- the index of latents -------------------------------------------------------------------

  function renderIndex(index) {
    const cols = Object.fromEntries(index.columns.map((c, i) => [c, i]));
    const rows = index.rows;
    const body = document.querySelector("#latents tbody");
    const count = document.getElementById("count");
    const filter = document.getElementById("filter");
    const state = { key: "latent", descending: false };

    function matching(query) {
      const q = query.trim().toLowerCase();
      if (!q) return null;
      const ids = new Set();
      data.tokens.tokens.forEach((s, id) => {
        if (s.trim().toLowerCase() === q) ids.add(id);
      });
      return ids;
    }

    function draw() {
      const ids = matching(filter.value);
      const shown = rows.filter(
        (r) => ids === null || r[cols.context_tokens].some((t) => ids.has(t))
      );
      const k = cols[state.key];
      const sign = state.descending ? -1 : 1;
      shown.sort((a, b) => {
        const x = a[k], y = b[k];
        if (x === null && y === null) return a[0] - b[0];
        if (x === null) return 1; // unknown values last, either direction
        if (y === null) return -1;
        return sign * (x - y) || a[0] - b[0];
      });
      const frag = document.createDocumentFragment();
      for (const r of shown) {
        const link = el("a", { href: "latent.html#" + r[0], text: String(r[0]) });
        const tops = el("td", { class: "tokens" });
        r[cols.top_tokens].forEach((t) => tops.append(tokenChip(t)));
        frag.append(
          el(
            "tr",
            { "data-latent": String(r[0]) },
            el("td", {}, link),
            el("td", { text: percent(r[cols.frac_nonzero]) }),
            el("td", { text: fmt(r[cols.seed_stability]) }),
            el("td", { text: fmt(r[cols.training_stability]) }),
            el("td", { text: fmt(r[cols.max_value]) }),
            tops
          )
        );
      }
      body.replaceChildren(frag);
      count.textContent =
        shown.length === rows.length
          ? rows.length + " latents"
          : shown.length + " of " + rows.length + " latents have “" + filter.value.trim() + "” in their top contexts";
      document.querySelectorAll("#latents th[data-key]").forEach((th) => {
        const on = th.dataset.key === state.key;
        th.setAttribute("aria-sort", on ? (state.descending ? "descending" : "ascending") : "none");
      });
    }

    document.querySelectorAll("#latents th[data-key]").forEach((th) => {
      th.tabIndex = 0;
      const sortBy = () => {
        // a new column sorts its largest values first (latent ids: smallest first)
        if (state.key === th.dataset.key) state.descending = !state.descending;
        else state.descending = th.dataset.key !== "latent";
        state.key = th.dataset.key;
        draw();
      };
      th.addEventListener("click", sortBy);
      th.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          sortBy();
        }
      });
    });
    filter.addEventListener("input", draw);
    draw();
  }

  // ---- a latent's page --------------------------------------------------------------------------

  function loadLatent() {
    const id = parseInt(location.hash.slice(1), 10);
    const main = document.getElementById("latent");
    if (!Number.isInteger(id) || id < 0) {
      main.replaceChildren(el("p", { text: "No latent chosen: open a latent from the index." }));
      return;
    }
    document.getElementById("latent-id").textContent = String(id);
    const old = document.getElementById("latent-data");
    if (old) old.remove();
    const script = el("script", { id: "latent-data", src: "latents/" + id + ".js" });
    script.onerror = () =>
      main.replaceChildren(el("p", { text: "Latent " + id + " has no page here (see the index)." }));
    document.body.append(script);
  }

  function renderLatent(doc) {
    const main = document.getElementById("latent");
    const present = doc.steps.filter((s) => s.latent !== null);
    const final = doc.steps[doc.steps.length - 1];
    document.title = doc.architecture_title + " · layer " + doc.layer + " · latent " + doc.latent;
    main.replaceChildren(
      el("h1", { text: doc.architecture_title + ", layer " + doc.layer + ", latent " + doc.latent }),
      el("p", {
        class: "lead",
        text:
          "The latent of seed " + doc.seed + "'s SAE at step " + final.step +
          ", followed back through training: at each earlier checkpoint, its optimal decoder match" +
          " in the SAE of the same seed (one-to-one, chained step by step). Activations are coloured" +
          " relative to the latent's maximum at that checkpoint; hover a token for its value.",
      }),
      el("div", { class: "overview" }, trajectory(doc.steps), stepTable(doc.steps))
    );
    for (const s of present.slice().reverse()) main.append(stepSection(doc, s));
  }

  function stepTable(steps) {
    const head = el("tr", {}, ...["step", "latent", "density", "max", "cos. to previous", "cos. to final"].map((t) => el("th", { text: t })));
    const rows = steps.map((s) =>
      el(
        "tr",
        {},
        el("td", {}, el("a", { href: "#step-" + s.step, text: String(s.step) })),
        el("td", { text: s.latent === null ? "unmatched" : String(s.latent) }),
        el("td", { text: percent(s.frac_nonzero) }),
        el("td", { text: fmt(s.max_value) }),
        el("td", { text: fmt(s.cosine_previous) }),
        el("td", { text: fmt(s.cosine_final) })
      )
    );
    return el("table", { class: "metrics" }, el("thead", {}, head), el("tbody", {}, ...rows));
  }

  // cosine of the chained decoder direction to the final one, against the checkpoints
  function trajectory(steps) {
    const w = 300, h = 150, left = 36, right = 10, top = 12, bottom = 30;
    const box = svg("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "trajectory", role: "img" });
    const title = svg("title");
    title.textContent = "decoder cosine to the final-step latent, per checkpoint";
    box.append(title);
    const x = (i) => left + (steps.length === 1 ? 0.5 : i / (steps.length - 1)) * (w - left - right);
    const y = (v) => top + (1 - v) * (h - top - bottom);
    for (const v of [0, 0.5, 1]) {
      box.append(svg("line", { x1: left, x2: w - right, y1: y(v), y2: y(v), class: "grid" }));
      const t = svg("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end", class: "axis" });
      t.textContent = v.toFixed(1);
      box.append(t);
    }
    let path = "";
    steps.forEach((s, i) => {
      const t = svg("text", { x: x(i), y: h - bottom + 16, "text-anchor": "middle", class: "axis" });
      t.textContent = String(s.step);
      box.append(t);
      if (s.cosine_final === null) return;
      const v = Math.max(0, s.cosine_final);
      path += (path ? "L" : "M") + x(i).toFixed(1) + "," + y(v).toFixed(1);
      const dot = svg("circle", { cx: x(i), cy: y(v), r: 3.5, class: "dot" });
      const tip = svg("title");
      tip.textContent = "step " + s.step + ": cosine " + fmt(s.cosine_final);
      dot.append(tip);
      box.append(dot);
    });
    if (path) box.insertBefore(svg("path", { d: path, class: "line" }), box.querySelector("circle"));
    const label = svg("text", { x: left, y: h - 2, class: "axis" });
    label.textContent = "step (LM checkpoint) → cosine to the final latent";
    box.append(label);
    return el("figure", { class: "plot" }, box);
  }

  function histogram(counts, max) {
    const w = 260, h = 90, pad = 4;
    const box = svg("svg", { width: w, height: h + 16, viewBox: `0 0 ${w} ${h + 16}`, class: "histogram", role: "img" });
    const title = svg("title");
    title.textContent = "activations on the eval tokens where the latent fires, " + counts.length + " bins over (0, " + fmt(max) + "]";
    box.append(title);
    const peak = Math.max(1, ...counts);
    const bw = (w - 2 * pad) / counts.length;
    counts.forEach((c, i) => {
      const bh = c === 0 ? 0 : Math.max(1, (c / peak) * h);
      const bar = svg("rect", { x: pad + i * bw, y: h - bh, width: Math.max(1, bw - 1), height: bh, class: "bar" });
      const tip = svg("title");
      tip.textContent = c + " tokens in (" + fmt((i * max) / counts.length) + ", " + fmt(((i + 1) * max) / counts.length) + "]";
      bar.append(tip);
      box.append(bar);
    });
    for (const [xx, anchor, text] of [[pad, "start", "0"], [w - pad, "end", fmt(max)]]) {
      const t = svg("text", { x: xx, y: h + 13, "text-anchor": anchor, class: "axis" });
      t.textContent = text;
      box.append(t);
    }
    return el("figure", { class: "plot" }, el("figcaption", { text: "activation histogram" }), box);
  }

  // one context: each token shaded by its activation relative to the latent's maximum `max`
  function context(c, max) {
    const line = el("div", { class: "context" });
    c.tokens.forEach((t, i) => {
      const v = c.values[i];
      const span = el("span", { class: i === c.maxValueTokenIndex ? "tok max" : "tok", text: display(t) });
      if (v > 0) span.style.backgroundColor = "rgba(255, 102, 0, " + (0.08 + 0.92 * Math.min(v / max, 1)).toFixed(2) + ")";
      span.title = "token " + JSON.stringify(data.tokens.tokens[t] || "") + ", activation " + fmt(v);
      line.append(span);
    });
    return el("li", {}, el("span", { class: "value", text: fmt(c.maxValue) }), line);
  }

  function logitList(label, tokens, values) {
    const items = tokens.map((t, i) =>
      el("li", {}, tokenChip(t), el("span", { class: "muted", text: " " + (values[i] >= 0 ? "+" : "") + fmt(values[i]) }))
    );
    return el("div", { class: "logits" }, el("h4", { text: label }), el("ol", {}, ...items));
  }

  function partnerTable(doc, s) {
    const head = el("tr", {}, ...["seed", "latent", "cosine", "density", "top tokens"].map((t) => el("th", { text: t })));
    const rows = s.partners.map((p) => {
      const tokens = el("td", { class: "tokens" });
      p.top_tokens.forEach((t) => tokens.append(tokenChip(t)));
      return el(
        "tr",
        { class: p.seed === doc.seed ? "self" : "" },
        el("td", { text: p.seed === doc.seed ? p.seed + " (this latent)" : String(p.seed) }),
        el("td", { text: p.latent === null ? "unmatched" : String(p.latent) }),
        el("td", { text: fmt(p.cosine) }),
        el("td", { text: percent(p.frac_nonzero) }),
        tokens
      );
    });
    return el("table", { class: "partners metrics" }, el("thead", {}, head), el("tbody", {}, ...rows));
  }

  function stepSection(doc, s) {
    const contexts = s.activations.length
      ? el("ol", { class: "contexts" }, ...s.activations.map((c) => context(c, s.max_value)))
      : el("p", { class: "muted", text: "This latent does not fire on the eval tokens at this checkpoint." });
    return el(
      "section",
      { class: "step", id: "step-" + s.step, "data-step": String(s.step) },
      el("h2", { text: "Step " + s.step + " · latent " + s.latent }),
      el(
        "p",
        { class: "muted" },
        "density " + percent(s.frac_nonzero) + " · max " + fmt(s.max_value) +
          (s.cosine_previous === null ? "" : " · cosine to its match at the previous checkpoint " + fmt(s.cosine_previous)) +
          " · cosine to the final latent " + fmt(s.cosine_final)
      ),
      el(
        "div",
        { class: "columns" },
        el("div", { class: "left" }, el("h3", { text: "Top activating eval contexts" }), contexts),
        el(
          "div",
          { class: "right" },
          histogram(s.freq_hist_data_bar_heights, s.max_value || 0),
          el("div", { class: "pair" }, logitList("promotes", s.pos_tokens, s.pos_values), logitList("suppresses", s.neg_tokens, s.neg_values)),
          el("h3", { text: "In every seed (optimal decoder match)" }),
          partnerTable(doc, s)
        )
      )
    );
  }

  if (document.body.dataset.page === "latent") {
    window.addEventListener("hashchange", loadLatent);
    document.addEventListener("DOMContentLoaded", loadLatent);
  }
  return { receive };
})();
