// The gallery's sorting, filtering, pages and full-size viewer, over window.HIRESCAM_REPORT (data.js).
// Every text from the run goes into the page through textContent or setAttribute, never as HTML.
"use strict";
(() => {
  const data = window.HIRESCAM_REPORT;
  if (!data) return;
  const images = data.images;
  const methods = data.methods; // [[key, display name], ...] in the order of each target's m
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
  const fixed = (v, digits) => (v === null || v === undefined || !isFinite(v) ? "–" : v.toFixed(digits));
  const exponent = (v) => (v === null || v === undefined || !isFinite(v) ? "–" : v.toExponential(1));

  // ---- sort keys: [key, direction]; missing values always sort last, input order breaks ties
  const over = (r, field, pick) => {
    const values = (r.t || []).map((t) => t[field]).filter((v) => v !== null && v !== undefined && isFinite(v));
    return values.length ? pick(...values) : null;
  };
  const SORTS = {
    input: null,
    disagreement: [(r) => over(r, "r", Math.min), 1, (r) => over(r, "u", Math.min)],
    probability: [(r) => over(r, "p", Math.max), -1],
    "probability-low": [(r) => over(r, "p", Math.min), 1],
    gap: [(r) => over(r, "g", (...v) => Math.max(...v.map(Math.abs))), -1],
  };
  const cache = {};
  function sortedIndices(name) {
    if (cache[name]) return cache[name];
    const order = images.map((_, i) => i);
    const spec = SORTS[name];
    if (spec) {
      const [keyOf, direction, tieOf] = spec;
      const keys = images.map(keyOf);
      const ties = tieOf ? images.map(tieOf) : null;
      const compare = (a, b) => {
        if (a === b) return 0;
        if (a === null) return 1;
        if (b === null) return -1;
        return direction * (a - b);
      };
      order.sort((a, b) => compare(keys[a], keys[b]) || (ties && compare(ties[a], ties[b])) || a - b);
    }
    return (cache[name] = order);
  }

  // ---- state, kept in the address's #fragment so a view can be bookmarked and reloaded
  const controls = { sort: $("sort"), cls: $("class"), status: $("status"), name: $("name"), perPage: $("per-page") };
  const state = { sort: "input", cls: "", none: false, status: "", name: "", perPage: data.page_size, page: 1 };

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (SORTS.hasOwnProperty(params.get("sort"))) state.sort = params.get("sort");
    state.cls = params.get("class") || "";
    state.none = params.get("none") === "1";
    state.status = params.get("status") || "";
    state.name = params.get("name") || "";
    state.perPage = [24, 48, 96].includes(Number(params.get("per"))) ? Number(params.get("per")) : data.page_size;
    state.page = Math.max(1, parseInt(params.get("page"), 10) || 1);
  }
  function writeHash() {
    const params = new URLSearchParams();
    if (state.sort !== "input") params.set("sort", state.sort);
    if (state.cls) params.set("class", state.cls);
    if (state.none) params.set("none", "1");
    if (state.status) params.set("status", state.status);
    if (state.name) params.set("name", state.name);
    if (state.perPage !== data.page_size) params.set("per", String(state.perPage));
    if (state.page > 1) params.set("page", String(state.page));
    const text = params.toString();
    history.replaceState(null, "", text ? "#" + text : location.pathname + location.search);
  }
  function isDefault() {
    return state.sort === "input" && !state.cls && !state.none && !state.status && !state.name &&
      state.perPage === data.page_size && state.page === 1;
  }
  function showState() {
    controls.sort.value = state.sort;
    controls.status.value = state.status;
    controls.name.value = state.name;
    controls.perPage.value = String(state.perPage);
    for (const option of controls.cls.options) {
      option.selected = state.none ? option.dataset.none === "1" : option.value === state.cls && !option.dataset.none;
    }
  }

  function matches(r) {
    if (state.status && r.s !== state.status) return false;
    if (state.none && !(r.s !== "error" && !(r.t || []).length)) return false;
    if (state.cls && !(r.t || []).some((t) => t.l === state.cls)) return false;
    if (state.name && !r.n.toLowerCase().includes(state.name.toLowerCase())) return false;
    return true;
  }

  // ---- rendering: the same markup as the HTML's first page (_card.html.j2)
  function thumb(name, alt) {
    return name
      ? el("img", { src: "thumbs/" + name, alt: alt, loading: "lazy", decoding: "async" })
      : el("span", { class: "missing" }, "no preview");
  }
  function renderCard(r) {
    const head = el("div", { class: "card-head" }, el("h2", { class: "name" }, r.n), el("span", { class: "status" }, r.s));
    if (r.s !== "error") head.append(el("button", { type: "button", class: "open" }, "Full size"));
    const card = el("li", { class: "card " + r.s, "data-i": String(r.i) }, head);
    if (r.s === "error") {
      card.append(el("p", { class: "reason" }, r.e));
      return card;
    }
    const original = r.o
      ? el("a", { href: "thumbs/" + r.v }, el("img", { src: "thumbs/" + r.o, alt: "Original image " + r.n, loading: "lazy", decoding: "async" }))
      : r.d ? el("span", { class: "missing scan" }, r.d) : el("span", { class: "missing" }, "original not available");
    const targets = el("div", { class: "targets" });
    const body = el("div", { class: "card-body" }, el("figure", { class: "original" }, original, el("figcaption", {}, r.d ? "scan" : "original")), targets);
    for (const t of r.t || []) {
      const maps = el("div", { class: "maps" });
      t.m.forEach((cell, k) => {
        if (!cell) return;
        const name = methods[k][1];
        const caption = el("figcaption", {}, name);
        if (cell[2]) caption.append(" ", el("a", { class: "nifti", href: cell[2] }, "NIfTI"));
        maps.append(el("figure", {}, el("a", { href: cell[1] }, thumb(cell[0], name + " for " + t.l + " on " + r.n)), caption));
      });
      targets.append(el("section", { class: "target" },
        el("h3", {}, el("span", { class: "label" }, t.l), " ", el("span", { class: "prob", title: "probability" }, "p " + fixed(t.p, 3))),
        el("p", { class: "numbers" },
          el("span", { title: "completeness gap" }, "gap " + exponent(t.g)), " ",
          el("span", { title: "Pearson r of HiResCAM and Grad-CAM" }, "r " + fixed(t.r, 2)), " ",
          el("span", { title: "top-20% IoU of HiResCAM and Grad-CAM" }, "IoU " + fixed(t.u, 2))),
        maps));
    }
    if (!(r.t || []).length) targets.append(el("p", { class: "none" }, r.z || "no class explained"));
    card.append(body);
    return card;
  }

  let shown = [];
  function render() {
    shown = sortedIndices(state.sort).filter((i) => matches(images[i]));
    const pages = Math.max(1, Math.ceil(shown.length / state.perPage));
    state.page = Math.min(state.page, pages);
    const start = (state.page - 1) * state.perPage;
    const slice = shown.slice(start, start + state.perPage);
    cards.replaceChildren(...slice.map((i) => renderCard(images[i])));
    updateStatus(start, slice.length, pages);
    writeHash();
  }
  function updateStatus(start, count, pages) {
    const total = shown.length;
    const sortName = controls.sort.options[controls.sort.selectedIndex].text;
    $("shown").textContent = total
      ? `Images ${start + 1}–${start + count} of ${total}` + (total < images.length ? ` (of ${images.length} in the run)` : "") + `, ${sortName}.`
      : `No image matches (of ${images.length} in the run).`;
    $("page-of").textContent = `Page ${state.page} of ${pages}`;
    $("prev").disabled = state.page <= 1;
    $("next").disabled = state.page >= pages;
  }

  // ---- the full-size viewer
  const viewer = $("viewer");
  function figure(src, alt, caption) {
    return el("figure", {}, el("a", { href: src, target: "_blank", rel: "noopener" }, el("img", { src: src, alt: alt, loading: "lazy" })), el("figcaption", {}, caption));
  }
  function openViewer(r) {
    $("viewer-title").textContent = r.n;
    const body = $("viewer-body");
    body.replaceChildren();
    for (const t of r.t || []) {
      const extra = [];
      if (t.f !== undefined) extra.push("prefix-token sum " + exponent(t.f));
      if (t.x) extra.push("HiResCAM = Grad-CAM by construction");
      body.append(el("h3", {}, `${t.l}: p ${fixed(t.p, 3)}, gap ${exponent(t.g)}, r ${fixed(t.r, 2)}, IoU ${fixed(t.u, 2)}` + (extra.length ? ", " + extra.join(", ") : "")));
      const row = el("div", { class: "viewer-row" });
      if (r.v) row.append(figure("thumbs/" + r.v, "Original image " + r.n, "original"));
      t.m.forEach((cell, k) => {
        if (!cell) return;
        const shown = figure(cell[1], methods[k][1] + " for " + t.l + " on " + r.n, methods[k][1]);
        if (cell[2]) shown.lastChild.append(" ", el("a", { class: "nifti", href: cell[2] }, "NIfTI"));
        row.append(shown);
      });
      body.append(row);
    }
    if (!(r.t || []).length && r.v) body.append(el("div", { class: "viewer-row" }, figure("thumbs/" + r.v, "Original image " + r.n, "original")));
    viewer.showModal();
  }
  $("viewer-close").addEventListener("click", () => viewer.close());
  viewer.addEventListener("click", (event) => { if (event.target === viewer) viewer.close(); });

  cards.addEventListener("click", (event) => {
    const card = event.target.closest("li.card");
    if (!card || card.classList.contains("error") || event.target.closest("a.nifti")) return; // a NIfTI link downloads
    if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return; // open in a new tab
    event.preventDefault();
    openViewer(images[Number(card.dataset.i)]);
  });

  // ---- controls
  function changed() {
    state.sort = controls.sort.value;
    const option = controls.cls.options[controls.cls.selectedIndex];
    state.none = option.dataset.none === "1";
    state.cls = state.none ? "" : option.value;
    state.status = controls.status.value;
    state.name = controls.name.value.trim();
    state.perPage = Number(controls.perPage.value);
    state.page = 1;
    render();
  }
  for (const control of [controls.sort, controls.cls, controls.status, controls.perPage]) control.addEventListener("change", changed);
  let typing = 0;
  controls.name.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(changed, 150); });
  $("controls").addEventListener("submit", (event) => { event.preventDefault(); changed(); });
  const turn = (step) => { state.page += step; render(); cards.scrollIntoView({ block: "start" }); };
  $("prev").addEventListener("click", () => turn(-1));
  $("next").addEventListener("click", () => turn(1));

  $("controls").hidden = false;
  $("pager").hidden = false;
  for (const button of cards.querySelectorAll("button.open")) button.hidden = false;
  readHash();
  showState();
  if (isDefault()) {
    shown = sortedIndices("input");
    updateStatus(0, Math.min(state.perPage, shown.length), Math.max(1, Math.ceil(shown.length / state.perPage)));
  } else {
    render();
  }
  document.documentElement.dataset.ready = String(performance.now()); // ms since navigation began
})();
