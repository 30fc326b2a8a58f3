// The comparison page's sorting, filtering and pages, over window.HIRESCAM_COMPARE (data.js).
// Every text from the runs goes into the page through textContent or setAttribute, never as HTML.
"use strict";
(() => {
  const data = window.HIRESCAM_COMPARE;
  if (!data) return;
  const records = data.records; // in BASE's input order
  const methods = data.methods; // [[key, display name], ...] in the order of each class's m
  const files = data.files;
  const $ = (id) => document.getElementById(id);
  const cards = $("cards");

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child); // strings become text nodes
    }
    return node;
  }
  const known = (v) => v !== null && v !== undefined && isFinite(v);
  const fixed = (v, digits) => (known(v) ? v.toFixed(digits) : "–");
  const exponent = (v) => (known(v) ? v.toExponential(1) : "–");

  // ---- orders: input order breaks every tie
  const byInput = (a, b) => a.i - b.i;
  const nullsLastDescending = (key) => (a, b) => {
    const x = key(a), y = key(b);
    if (known(x) !== known(y)) return known(x) ? -1 : 1;
    return (known(x) ? y - x : 0) || byInput(a, b);
  };
  const SORTS = {
    // no agreement to measure (no class on both sides, no maps) first, then the lowest r
    agreement: (a, b) => {
      if (known(a.a) !== known(b.a)) return known(a.a) ? 1 : -1;
      return (known(a.a) ? a.a - b.a : 0) || byInput(a, b);
    },
    input: byInput,
    probability: nullsLastDescending((r) => r.d),
    peak: nullsLastDescending((r) => r.k),
  };
  const cache = {};
  const sorted = (name) => cache[name] || (cache[name] = records.slice().sort(SORTS[name]));

  // ---- state, kept in the address's #fragment so a view can be bookmarked and reloaded
  const controls = { sort: $("sort"), change: $("change"), cls: $("class"), name: $("name"), perPage: $("per-page") };
  const initial = { sort: "agreement", change: "", cls: "", name: "", perPage: data.page_size, page: 1 };
  const state = { ...initial };

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (SORTS.hasOwnProperty(params.get("sort"))) state.sort = params.get("sort");
    if (["top1", "top5", "same"].includes(params.get("change"))) state.change = params.get("change");
    state.cls = params.get("class") || "";
    state.name = params.get("name") || "";
    state.perPage = [24, 48, 96].includes(Number(params.get("per"))) ? Number(params.get("per")) : data.page_size;
    state.page = Math.max(1, parseInt(params.get("page"), 10) || 1);
  }
  function writeHash() {
    const params = new URLSearchParams();
    if (state.sort !== initial.sort) params.set("sort", state.sort);
    if (state.change) params.set("change", state.change);
    if (state.cls) params.set("class", state.cls);
    if (state.name) params.set("name", state.name);
    if (state.perPage !== data.page_size) params.set("per", String(state.perPage));
    if (state.page > 1) params.set("page", String(state.page));
    const text = params.toString();
    history.replaceState(null, "", text ? "#" + text : location.pathname + location.search);
  }
  const isDefault = () => Object.keys(initial).every((k) => state[k] === initial[k]);
  function showState() {
    controls.sort.value = state.sort;
    controls.change.value = state.change;
    controls.cls.value = state.cls;
    controls.name.value = state.name;
    controls.perPage.value = String(state.perPage);
  }

  function matches(r) {
    if (state.change === "top1" && !r.c) return false;
    if (state.change === "top5" && !r.f) return false;
    if (state.change === "same" && r.c) return false;
    if (state.cls && String(r.b[0]) !== state.cls) return false;
    if (state.name && !r.n.toLowerCase().includes(state.name.toLowerCase())) return false;
    return true;
  }

  // ---- rendering: the same markup as the HTML's first page (_compare_card.html.j2)
  function side(cell, at, label, alt) {
    let picture;
    if (cell[at + 1]) {
      const inner = cell[at]
        ? el("img", { src: files + "/thumbs/" + cell[at], alt: alt, loading: "lazy", decoding: "async" })
        : el("span", { class: "missing" }, "no preview");
      picture = el("a", { href: cell[at + 1] }, inner);
    } else {
      picture = el("span", { class: "missing" }, "no picture");
    }
    return el("figure", {}, picture, el("figcaption", {}, label));
  }
  function renderCard(r) {
    const card = el("li", { class: "card pair" + (r.c ? " changed" : ""), "data-i": String(r.i) },
      el("div", { class: "card-head" }, el("h2", { class: "name" }, r.n),
        el("span", { class: "agreement", title: "lowest Pearson r over the classes explained on both sides" }, "r " + fixed(r.a, 2))));
    const prediction = el("p", { class: "prediction" },
      el("span", { class: "side" }, "BASE"), " ", el("span", { class: "label" }, String(r.b[0])), " ",
      el("span", { class: "prob" }, "p " + fixed(r.b[1], 3)), " → ",
      el("span", { class: "side" }, "NEW"), " ", el("span", { class: "label" }, String(r.w[0])), " ",
      el("span", { class: "prob" }, "p " + fixed(r.w[1], 3)));
    if (r.c) prediction.append(" ", el("span", { class: "flag" }, "top-1 changed"));
    else if (r.f) prediction.append(" ", el("span", { class: "flag minor" }, "top-5 changed"));
    card.append(prediction);
    const original = r.o
      ? el("a", { href: files + "/thumbs/" + r.v }, el("img", { src: files + "/thumbs/" + r.o, alt: "Original image " + r.n, loading: "lazy", decoding: "async" }))
      : el("span", { class: "missing" }, "original not available");
    const targets = el("div", { class: "targets" });
    for (const t of r.t) {
      const pairs = el("div", { class: "pairs" });
      t.m.forEach((cell, k) => {
        if (!cell) return;
        const name = methods[k][1];
        const alt = (label) => label + " " + name + " for " + t.l + " on " + r.n;
        pairs.append(el("figure", { class: "method" },
          el("div", { class: "sides" }, side(cell, 3, "BASE", alt("BASE")), side(cell, 5, "NEW", alt("NEW"))),
          el("figcaption", {}, `${name}: r ${fixed(cell[0], 2)} · IoU ${fixed(cell[1], 2)} · peak ${fixed(cell[2], 0)} px`)));
      });
      targets.append(el("section", { class: "target" },
        el("h3", {}, el("span", { class: "label" }, t.l), " ",
          el("span", { class: "prob", title: "probability, BASE → NEW" }, `p ${fixed(t.pb, 3)} → ${fixed(t.pn, 3)}`)),
        el("p", { class: "numbers" }, el("span", { title: "HiResCAM completeness gap, BASE / NEW" }, `gap ${exponent(t.gb)} / ${exponent(t.gn)}`)),
        pairs));
    }
    if (r.x) targets.append(el("p", { class: "none" }, r.x));
    if (r.z) targets.append(el("p", { class: "problem" }, r.z));
    card.append(el("div", { class: "card-body" }, el("figure", { class: "original" }, original, el("figcaption", {}, "original")), targets));
    return card;
  }

  let shown = [];
  function render() {
    shown = sorted(state.sort).filter(matches);
    const pages = Math.max(1, Math.ceil(shown.length / state.perPage));
    state.page = Math.min(state.page, pages);
    const start = (state.page - 1) * state.perPage;
    const slice = shown.slice(start, start + state.perPage);
    cards.replaceChildren(...slice.map(renderCard));
    updateStatus(start, slice.length, pages);
    writeHash();
  }
  function updateStatus(start, count, pages) {
    const total = shown.length;
    const sortName = controls.sort.options[controls.sort.selectedIndex].text;
    $("shown").textContent = total
      ? `Inputs ${start + 1}–${start + count} of ${total}` + (total < records.length ? ` (of ${records.length} compared)` : "") + `, ${sortName}.`
      : `No input matches (of ${records.length} compared).`;
    $("page-of").textContent = `Page ${state.page} of ${pages}`;
    $("prev").disabled = state.page <= 1;
    $("next").disabled = state.page >= pages;
  }

  // ---- controls
  function changed() {
    state.sort = controls.sort.value;
    state.change = controls.change.value;
    state.cls = controls.cls.value;
    state.name = controls.name.value.trim();
    state.perPage = Number(controls.perPage.value);
    state.page = 1;
    render();
  }
  for (const control of [controls.sort, controls.change, controls.cls, controls.perPage]) control.addEventListener("change", changed);
  let typing = 0;
  controls.name.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(changed, 150); });
  $("controls").addEventListener("submit", (event) => { event.preventDefault(); changed(); });
  const turn = (step) => { state.page += step; render(); cards.scrollIntoView({ block: "start" }); };
  $("prev").addEventListener("click", () => turn(-1));
  $("next").addEventListener("click", () => turn(1));

  $("controls").hidden = false;
  $("pager").hidden = false;
  readHash();
  showState();
  if (isDefault()) {
    shown = sorted(state.sort);
    updateStatus(0, Math.min(state.perPage, shown.length), Math.max(1, Math.ceil(shown.length / state.perPage)));
  } else {
    render();
  }
  document.documentElement.dataset.ready = String(performance.now()); // ms since navigation began
})();
