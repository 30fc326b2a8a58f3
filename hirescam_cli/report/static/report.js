// The gallery's sorting, filtering, pages and full-size viewer. index.js gives every input's index row
// (window.HIRESCAM_REPORT); the cards come in chunks, cards/<digest>.js, loaded when a page shows one
// of their inputs. Every text from the run goes into the page through textContent or setAttribute,
// never as HTML.
"use strict";
(() => {
  const data = window.HIRESCAM_REPORT;
  if (!data) return;
  const rows = data.rows; // per input: [name, label ids, p max, p min, r min, IoU min, |gap| max]
  const total = rows.length;
  const STATUS = { o: "ok", s: "skipped", e: "error" };
  const methods = data.methods; // [[key, display name], ...] in the order of each target's m
  const labelIds = new Map(data.labels.map((label, id) => [label, id]));
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

  // ---- the chunks: input i is the (i - first[c])-th card of chunk c = chunkOf[i]
  const chunkOf = new Uint32Array(total);
  const first = new Uint32Array(data.chunks.length);
  data.chunks.reduce((at, [, count], c) => {
    first[c] = at;
    chunkOf.fill(c, at, at + count);
    return at + count;
  }, 0);
  const loaded = new Map(); // digest -> the chunk's records
  const loading = new Map(); // digest -> a promise of them
  window.HIRESCAM_CARDS = (digest, records) => loaded.set(digest, records);
  function load(c) {
    const digest = data.chunks[c][0];
    if (loaded.has(digest)) return Promise.resolve();
    if (!loading.has(digest)) {
      loading.set(digest, new Promise((resolve, reject) => {
        const script = el("script", { src: "cards/" + digest + ".js" });
        const fail = () => {
          loading.delete(digest);
          script.remove();
          reject(new Error("cannot load " + script.getAttribute("src")));
        };
        script.addEventListener("load", () => (loaded.has(digest) ? resolve() : fail()));
        script.addEventListener("error", fail);
        document.head.append(script);
      }));
    }
    return loading.get(digest);
  }
  async function records(indices) {
    await Promise.all([...new Set(Array.from(indices, (i) => chunkOf[i]))].map(load));
    return Array.from(indices, (i) => loaded.get(data.chunks[chunkOf[i]][0])[i - first[chunkOf[i]]]);
  }

  // ---- sort keys: [column, direction] of the rows; missing values always sort last, input order breaks ties
  const SORTS = {
    input: null,
    disagreement: [[4, 1], [5, 1]],
    probability: [[2, -1]],
    "probability-low": [[3, 1]],
    gap: [[6, -1]],
  };
  const HIGH = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1 ? 1 : 0; // the word with a double's sign
  function words(k, direction) {
    // Two 32-bit words per input whose order (high, then low) is that of column k (reversed for direction
    // -1); a missing value gets all ones, which no number does, so it sorts last either way.
    const high = new Uint32Array(total), low = new Uint32Array(total);
    const number = new Float64Array(1), bits = new Uint32Array(number.buffer);
    for (let i = 0; i < total; i++) {
      const v = rows[i][k];
      if (v === null) {
        high[i] = low[i] = 0xffffffff;
        continue;
      }
      number[0] = v === 0 ? 0 : v; // -0 as 0
      let h = bits[HIGH], l = bits[1 - HIGH];
      if (h & 0x80000000) { // negative: larger magnitudes first
        h = ~h;
        l = ~l;
      } else {
        h |= 0x80000000;
      }
      high[i] = direction < 0 ? ~h : h;
      low[i] = direction < 0 ? ~l : l;
    }
    return [high, low];
  }
  function radixSort(order, word) {
    // Stable: ties keep the order they come in; 16 bits a pass.
    const count = new Uint32Array(65536);
    const n = order.length;
    let from = order, to = new Uint32Array(n);
    for (let shift = 0; shift < 32; shift += 16) {
      count.fill(0);
      for (let k = 0; k < n; k++) count[(word[from[k]] >>> shift) & 0xffff]++;
      for (let d = 0, sum = 0; d < 65536; d++) {
        const c = count[d];
        count[d] = sum;
        sum += c;
      }
      for (let k = 0; k < n; k++) {
        const i = from[k];
        to[count[(word[i] >>> shift) & 0xffff]++] = i;
      }
      const done = to;
      to = from;
      from = done;
    }
    return from;
  }
  const sorted = {};
  function sortedIndices(name) {
    if (sorted[name]) return sorted[name];
    let order = new Uint32Array(total);
    for (let i = 0; i < total; i++) order[i] = i;
    for (const [k, direction] of [...(SORTS[name] || [])].reverse()) { // least significant key first
      const [high, low] = words(k, direction);
      order = radixSort(radixSort(order, low), high);
    }
    return (sorted[name] = order);
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

  let lowerNames = null;
  function matcher() {
    const status = data.status, letter = state.status ? state.status[0] : "";
    const label = state.cls ? labelIds.get(state.cls) : undefined;
    const name = state.name.toLowerCase();
    if (name && !lowerNames) lowerNames = rows.map((row) => row[0].toLowerCase());
    return (i) => {
      if (letter && status[i] !== letter) return false;
      if (state.none && !(status[i] !== "e" && !rows[i][1].length)) return false;
      if (state.cls && !rows[i][1].includes(label)) return false;
      if (name && !lowerNames[i].includes(name)) return false;
      return true;
    };
  }

  // ---- rendering: the same markup as the HTML's first page (_card.html.j2 and cards/<kind>.html.j2)
  function thumb(name, alt) {
    return name
      ? el("img", { src: "thumbs/" + name, alt: alt, loading: "lazy", decoding: "async" })
      : el("span", { class: "missing" }, "no preview");
  }
  function figure(src, alt, caption) {
    return el("figure", {}, el("a", { href: src, target: "_blank", rel: "noopener" }, el("img", { src: src, alt: alt, loading: "lazy" })), el("figcaption", {}, caption));
  }
  // a map cell's NIfTI link (volumes), after a space; nothing where the cell has none
  const niftiLink = (cell) => (cell[2] ? [" ", el("a", { class: "nifti", href: cell[2] }, "NIfTI")] : []);
  // The targets of a card, whatever its kind (templates/cards/_targets.html.j2): per class its numbers and
  // a thumbnail per method, a map's NIfTI file linked where its cell has one.
  function targetsOf(r) {
    const targets = el("div", { class: "targets" });
    for (const t of r.t) {
      const maps = el("div", { class: "maps" });
      t.m.forEach((cell, k) => {
        if (!cell) return;
        const name = methods[k][1];
        maps.append(el("figure", {}, el("a", { href: cell[1] }, thumb(cell[0], name + " for " + t.l + " on " + r.n)), el("figcaption", {}, name, ...niftiLink(cell))));
      });
      targets.append(el("section", { class: "target" },
        el("h3", {}, el("span", { class: "label" }, t.l), " ", el("span", { class: "prob", title: "probability" }, "p " + fixed(t.p, 3))),
        el("p", { class: "numbers" },
          el("span", { title: "completeness gap" }, "gap " + exponent(t.g)), " ",
          el("span", { title: "Pearson r of HiResCAM and Grad-CAM" }, "r " + fixed(t.r, 2)), " ",
          el("span", { title: "top-20% IoU of HiResCAM and Grad-CAM" }, "IoU " + fixed(t.u, 2))),
        maps));
    }
    if (!r.t.length) targets.append(el("p", { class: "none" }, r.z || "no class explained"));
    return targets;
  }
  const numbers = (t) => `p ${fixed(t.p, 3)}, gap ${exponent(t.g)}, r ${fixed(t.r, 2)}, IoU ${fixed(t.u, 2)}`;

  // Per kind of card (cards.py's CARD_KINDS, in its order): its body in the grid, and what the full-size
  // viewer shows.
  const KINDS = {
    volume: {
      body(r) {
        const scan = el("figure", { class: "original" }, el("span", { class: "missing scan" }, r.d), el("figcaption", {}, "scan"));
        return el("div", { class: "card-body" }, scan, targetsOf(r));
      },
      viewer(r) {
        const parts = [el("p", {}, r.d)];
        for (const t of r.t) {
          parts.push(el("h3", {}, `${t.l}: ${numbers(t)}`));
          const row = el("div", { class: "viewer-row" });
          t.m.forEach((cell, k) => {
            if (!cell) return;
            const shown = figure(cell[1], methods[k][1] + " for " + t.l + " on " + r.n, methods[k][1]);
            shown.lastChild.append(...niftiLink(cell));
            row.append(shown);
          });
          parts.push(row);
        }
        return parts;
      },
    },
    image: {
      body(r) {
        const original = r.o
          ? el("a", { href: "thumbs/" + r.v }, el("img", { src: "thumbs/" + r.o, alt: "Original image " + r.n, loading: "lazy", decoding: "async" }))
          : el("span", { class: "missing" }, "original not available");
        return el("div", { class: "card-body" }, el("figure", { class: "original" }, original, el("figcaption", {}, "original")), targetsOf(r));
      },
      viewer(r) {
        const parts = [];
        const original = () => figure("thumbs/" + r.v, "Original image " + r.n, "original");
        for (const t of r.t) {
          const extra = [];
          if (t.f !== undefined) extra.push("prefix-token sum " + exponent(t.f));
          if (t.x) extra.push("HiResCAM = Grad-CAM by construction");
          parts.push(el("h3", {}, `${t.l}: ${numbers(t)}` + (extra.length ? ", " + extra.join(", ") : "")));
          const row = el("div", { class: "viewer-row" });
          if (r.v) row.append(original());
          t.m.forEach((cell, k) => {
            if (cell) row.append(figure(cell[1], methods[k][1] + " for " + t.l + " on " + r.n, methods[k][1]));
          });
          parts.push(row);
        }
        if (!r.t.length && r.v) parts.push(el("div", { class: "viewer-row" }, original()));
        return parts;
      },
    },
  };

  function renderCard(r, i) {
    const status = STATUS[data.status[i]];
    const head = el("div", { class: "card-head" }, el("h2", { class: "name" }, r.n), el("span", { class: "status" }, status));
    if (status !== "error") head.append(el("button", { type: "button", class: "open" }, "Full size"));
    const card = el("li", { class: "card " + status, "data-i": String(i) }, head);
    card.append(status === "error" ? el("p", { class: "reason" }, r.e) : KINDS[r.k].body(r));
    return card;
  }

  let shown = [];
  let drawing = 0; // the latest page asked for: an older one that arrives late is not shown
  function render() {
    const order = sortedIndices(state.sort);
    const isShown = matcher();
    shown = state.status || state.cls || state.none || state.name ? order.filter(isShown) : order;
    const pages = Math.max(1, Math.ceil(shown.length / state.perPage));
    state.page = Math.min(state.page, pages);
    const start = (state.page - 1) * state.perPage;
    const slice = shown.slice(start, start + state.perPage);
    updateStatus(start, slice.length, pages);
    writeHash();
    const mine = ++drawing;
    cards.setAttribute("aria-busy", "true");
    records(slice).then(
      (found) => {
        if (mine !== drawing) return;
        cards.replaceChildren(...found.map((r, k) => renderCard(r, slice[k])));
        cards.setAttribute("aria-busy", "false");
      },
      (error) => {
        if (mine !== drawing) return;
        cards.replaceChildren();
        cards.setAttribute("aria-busy", "false");
        $("shown").textContent = `The cards of this page cannot be shown: ${error.message}.`;
      });
  }
  function updateStatus(start, count, pages) {
    const matching = shown.length;
    const sortName = controls.sort.options[controls.sort.selectedIndex].text;
    $("shown").textContent = matching
      ? `Images ${start + 1}–${start + count} of ${matching}` + (matching < total ? ` (of ${total} in the run)` : "") + `, ${sortName}.`
      : `No image matches (of ${total} in the run).`;
    $("page-of").textContent = `Page ${state.page} of ${pages}`;
    $("prev").disabled = state.page <= 1;
    $("next").disabled = state.page >= pages;
  }

  // ---- the full-size viewer
  const viewer = $("viewer");
  let opening = 0;
  function openViewer(i) {
    const mine = ++opening;
    records([i]).then(([r]) => {
      if (mine !== opening) return;
      $("viewer-title").textContent = r.n;
      $("viewer-body").replaceChildren(...KINDS[r.k].viewer(r));
      viewer.showModal();
    }, (error) => console.error(error.message));
  }
  $("viewer-close").addEventListener("click", () => viewer.close());
  viewer.addEventListener("click", (event) => { if (event.target === viewer) viewer.close(); });

  cards.addEventListener("click", (event) => {
    const card = event.target.closest("li.card");
    if (!card || card.classList.contains("error") || event.target.closest("a.nifti")) return; // a NIfTI link downloads
    if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return; // open in a new tab
    event.preventDefault();
    openViewer(Number(card.dataset.i));
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
