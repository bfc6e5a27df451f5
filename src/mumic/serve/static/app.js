// The page of `mumic serve`: tags of an image (POST predict), zero-shot labels scored with
// them (extra_labels), and the nearest catalogue images of a text or image (POST search,
// GET gallery/ROW). Only the service's own API is called; its error messages are shown as sent.
// A service started with --token answers 401 without the token: the page then asks for it, keeps
// it in sessionStorage (this tab only: never in the URL or localStorage), sends it as
// `Authorization: Bearer ...` on every call, and shows catalogue images through blob: URLs.
"use strict";

const TOKEN_KEY = "mumic-token";

const state = {
  file: null,          // the image being tagged (a File or Blob)
  fileName: "",
  previewUrl: null,
  thresholds: {},      // run label -> calibrated threshold (GET labels)
  defaultThreshold: 0.5,
  extra: [],           // zero-shot labels added on the page, in order
  predictSeq: 0,       // only the answer to the latest request is shown
  lastResult: null,
  showAll: false,      // every label, or the best SHOWN ones, the decided ones and the zero-shot ones
  searchSeq: 0,
  token: "",           // the access token entered on the page, "" without one
  gallerySeq: 0,       // a thumbnail fetched for a gallery since replaced is dropped
  galleryUrls: [],     // object URLs of the gallery's thumbnails (with a token), revoked when it is replaced
  galleryObserver: null,
};

const $ = (id) => document.getElementById(id);
const SHOWN = 15;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const fmt = (x) => Number(x).toFixed(3);
const baseName = (p) => String(p).split(/[\\/]/).pop();
// what a catalogue item is called: a text column of its manifest (name, title, caption), else its file name
const itemName = (hit) => ["name", "title", "caption"].map((k) => hit[k]).find((v) => typeof v === "string" && v) || baseName(hit.image);

// The API's refusal as one line: {"detail": "..."} or a list of {loc, msg}.
async function errorText(resp) {
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const where = (d.loc || []).filter((p) => p !== "body").join(".");
      return where ? `${where}: ${d.msg}` : d.msg;
    }).join("; ");
  }
  return `the service answered ${resp.status} ${resp.statusText}`;
}

// A call to the API, with the access token when there is one; a refusal throws the API's message
// (with its status), and a 401 asks for the token.
async function call(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  let resp;
  try {
    resp = await fetch(path, { ...init, headers });
  } catch (e) {
    throw new Error(`the service cannot be reached (${e.message})`);
  }
  if (!resp.ok) {
    const error = new Error(await errorText(resp));
    error.status = resp.status;
    if (resp.status === 401) askToken(error.message);
    throw error;
  }
  return resp;
}

function showError(id, message) {
  const node = $(id);
  node.textContent = message || "";
  node.hidden = !message;
}

// ------------------------------------------------------------------ start

async function start() {
  try { state.token = sessionStorage.getItem(TOKEN_KEY) || ""; } catch (_) { /* storage off: asked for again */ }
  wireToken();
  wireTagging();
  wireSearch();
  await loadRun();
}

// The run's description and thresholds (GET health, labels): true when the service answered.
async function loadRun() {
  try {
    const [health, labels] = await Promise.all([
      call("health").then((r) => r.json()),
      call("labels").then((r) => r.json()),
    ]);
    state.defaultThreshold = labels.default_threshold;
    for (const l of labels.labels) state.thresholds[l.name] = l.threshold;
    let info = `Run ${health.run}: ${health.labels} labels, ${health.image_size} px images`;
    if (health.index_items !== null && health.index_items !== undefined) {
      info += `, a catalogue of ${health.index_items} images`;
      $("search").hidden = false;
    }
    $("run-info").textContent = info + ".";
    if (!labels.zero_shot) {
      $("zs-input").disabled = true;
      $("zero-shot").querySelector("button").disabled = true;
      $("zero-shot").querySelector("label").textContent = "Zero-shot labels (not available: this run has a linear head)";
    }
    $("token-form").hidden = true;
    $("token-input").value = "";
    return true;
  } catch (e) {
    $("run-info").textContent = e.status === 401 ? "The service needs an access token." : `The service did not answer: ${e.message}`;
    return false;
  }
}

// ------------------------------------------------------------------ access token

function askToken(message) {
  $("token-message").textContent = message;
  $("token-form").hidden = false;
  const input = $("token-input");
  if (document.activeElement !== input) {
    input.focus();
    input.select();
  }
}

function wireToken() {
  $("token-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = $("token-input").value.trim();
    if (!/^[\x21-\x7e]+$/.test(token)) {  // what an HTTP header carries as the service compares it
      $("token-message").textContent = token ? "An access token is printable ASCII, without spaces." : "Enter the access token first.";
      return;
    }
    state.token = token;
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch (_) { /* kept for this page only */ }
    if (await loadRun() && state.file) predict(null);  // the image refused without the token, tagged now
  });
}

// ------------------------------------------------------------------ tagging

function wireTagging() {
  const drop = $("drop");
  $("file").addEventListener("change", (ev) => {
    const f = ev.target.files && ev.target.files[0];
    if (f) pickImage(f, f.name);
  });
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  }
  for (const kind of ["dragleave", "drop"]) {
    drop.addEventListener(kind, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const f = ev.dataTransfer && ev.dataTransfer.files[0];
    if (f) pickImage(f, f.name);
  });
  // a file dropped beside the zone must not navigate away from the page
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  $("tags-toggle").addEventListener("click", () => {
    state.showAll = !state.showAll;
    if (state.lastResult) renderTags(...state.lastResult);
  });
  $("zero-shot").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("zs-input");
    const name = input.value.trim();
    if (!name) return;
    input.value = "";
    if (!state.extra.includes(name) && !(name in state.thresholds)) state.extra.push(name);
    renderChips();
    predict(name);
  });
}

function pickImage(blob, name) {
  state.file = blob;
  state.fileName = name || "image";
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(blob);
  $("preview").src = state.previewUrl;
  $("preview").alt = `The image being tagged: ${state.fileName}`;
  $("preview-name").textContent = state.fileName;
  $("result").hidden = false;
  predict(null);
}

function renderChips() {
  const list = $("zs-list");
  list.replaceChildren();
  for (const name of state.extra) {
    const remove = el("button", { type: "button", class: "chip-remove", "aria-label": `Remove the label ${name}`, text: "\u00d7" });
    remove.addEventListener("click", () => {
      state.extra = state.extra.filter((n) => n !== name);
      renderChips();
      predict(null);
      $("zs-input").focus();
    });
    list.append(el("li", { class: "chip" }, el("span", { text: name }), remove));
  }
}

// `added`: the zero-shot label just added; it is taken back when the service refuses the request
async function predict(added) {
  if (!state.file) return;
  const seq = ++state.predictSeq;
  const form = new FormData();
  form.append("images", state.file, state.fileName);
  for (const name of state.extra) form.append("extra_labels", name);
  $("tags").setAttribute("aria-busy", "true");
  try {
    const body = await (await call("predict", { method: "POST", body: form })).json();
    if (seq !== state.predictSeq) return;
    showError("tag-error", "");
    renderTags(body.results[0], body.labels);
  } catch (e) {
    if (seq !== state.predictSeq) return;
    if (added) {
      state.extra = state.extra.filter((n) => n !== added);
      renderChips();
    }
    showError("tag-error", e.message);
  } finally {
    if (seq === state.predictSeq) $("tags").removeAttribute("aria-busy");
  }
}

function renderTags(result, labels) {
  state.lastResult = [result, labels];
  const decided = new Set(result.predicted);
  const list = $("tags");
  list.replaceChildren();
  list.dataset.image = result.filename || "";
  // highest first, ties in the order of the answer's labels (a JSON object's own order is not kept for names like "143")
  const order = new Map(labels.map((name, i) => [name, i]));
  const scores = Object.entries(result.scores).sort((a, b) => b[1] - a[1] || order.get(a[0]) - order.get(b[0]));
  let hidden = 0;
  scores.forEach(([name, p], rank) => {
    const zeroShot = !(name in state.thresholds);
    if (!state.showAll && rank >= SHOWN && !decided.has(name) && !zeroShot) {
      hidden += 1;
      return;
    }
    const t = zeroShot ? state.defaultThreshold : state.thresholds[name];
    const yes = decided.has(name);
    const fill = el("span", { class: "fill" });
    fill.style.width = `${(100 * p).toFixed(2)}%`;
    const mark = el("span", { class: "mark", title: `threshold ${fmt(t)}` });
    mark.style.left = `${(100 * t).toFixed(2)}%`;
    const bar = el("span", {
      class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": "1", "aria-valuenow": String(p),
      "aria-label": name, "aria-valuetext": `${fmt(p)}, threshold ${fmt(t)}${yes ? ", decided" : ""}`,
    }, fill, mark);
    const title = el("span", { class: "tag-name", text: name });
    if (zeroShot) title.append(" ", el("span", { class: "badge", text: "zero-shot" }));
    const value = el("span", { class: "tag-value" }, el("span", { class: "p", text: fmt(p) }),
      el("span", { class: "t", text: `${yes ? "\u2265" : "<"} ${fmt(t)}` }));
    list.append(el("li", { class: `tag${yes ? " decided" : ""}${zeroShot ? " zero-shot" : ""}`, "data-label": name }, title, bar, value));
  });
  const toggle = $("tags-toggle");
  toggle.hidden = !state.showAll && hidden === 0;
  toggle.textContent = state.showAll ? "Show fewer labels" : `Show all ${scores.length} labels (${hidden} more)`;
  toggle.setAttribute("aria-expanded", String(state.showAll));
}

// ------------------------------------------------------------------ search

function wireSearch() {
  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("search-input").value.trim();
    if (!text) {
      showError("search-error", "Type what to look for first.");
      return;
    }
    const k = Number($("search-k").value);
    search(`\u201c${text}\u201d`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text, k }) });
  });
}

async function galleryImage(hit) {
  const resp = await call(`gallery/${hit.id}`);
  return resp.blob();
}

async function moreLikeThis(hit) {
  try {
    const blob = await galleryImage(hit);
    const form = new FormData();
    form.append("image", blob, baseName(hit.image));
    form.append("k", $("search-k").value);
    await search(baseName(hit.image), { method: "POST", body: form });
  } catch (e) {
    showError("search-error", e.message);
  }
}

async function tagThis(hit) {
  try {
    pickImage(await galleryImage(hit), baseName(hit.image));
    $("tagging").scrollIntoView({ block: "start" });
  } catch (e) {
    showError("tag-error", e.message);
  }
}

async function search(what, init) {
  const seq = ++state.searchSeq;
  $("search-status").textContent = `Searching for ${what}\u2026`;
  $("gallery").setAttribute("aria-busy", "true");
  try {
    const body = await (await call("search", init)).json();
    if (seq !== state.searchSeq) return;
    showError("search-error", "");
    $("search-status").textContent =
      `${body.results.length} nearest catalogue images of ${what} (${body.exact ? "exact" : "approximate"} search, cosine similarity).`;
    renderGallery(body.results);
  } catch (e) {
    if (seq !== state.searchSeq) return;
    $("search-status").textContent = "";
    showError("search-error", e.message);
  } finally {
    if (seq === state.searchSeq) $("gallery").removeAttribute("aria-busy");
  }
}

function labelsText(value) {
  if (Array.isArray(value)) return value.join(", ");
  if (typeof value === "string") return value.split("|").filter(Boolean).join(", ");
  return "";
}

// Without a token an <img> loads its thumbnail itself (lazily); with one, the thumbnail is fetched
// with the token when it nears the view and shown through a blob: URL.
function clearGallery() {
  state.gallerySeq += 1;
  if (state.galleryObserver) state.galleryObserver.disconnect();
  state.galleryObserver = null;
  for (const url of state.galleryUrls) URL.revokeObjectURL(url);
  state.galleryUrls = [];
  $("gallery").replaceChildren();
}

async function showThumb(img, path, seq) {
  try {
    const blob = await (await call(path)).blob();
    if (seq !== state.gallerySeq) return;
    const url = URL.createObjectURL(blob);
    state.galleryUrls.push(url);
    img.src = url;
  } catch (e) {
    if (seq === state.gallerySeq) img.title = e.message;
  }
}

function thumbObserver(seq) {
  return new IntersectionObserver((entries, observer) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      observer.unobserve(entry.target);
      showThumb(entry.target, entry.target.dataset.thumb, seq);
    }
  }, { rootMargin: "200px" });
}

function renderGallery(hits) {
  clearGallery();
  const list = $("gallery");
  const observer = state.token ? (state.galleryObserver = thumbObserver(state.gallerySeq)) : null;
  for (const hit of hits) {
    const name = itemName(hit);
    const thumb = `gallery/${hit.id}?thumb=true`;
    const img = observer ? el("img", { alt: name, width: "160", height: "160", "data-thumb": thumb })
      : el("img", { src: thumb, alt: name, loading: "lazy", width: "160", height: "160" });
    const more = el("button", { type: "button", class: "more", "aria-label": `More like ${name}`, text: "More like this" });
    more.addEventListener("click", () => moreLikeThis(hit));
    const tag = el("button", { type: "button", class: "tag-this", "aria-label": `Tag ${name}`, text: "Tag it" });
    tag.addEventListener("click", () => tagThis(hit));
    const caption = el("figcaption", {},
      el("span", { class: "score", text: fmt(hit.score) }), " ", el("span", { class: "name", text: name }));
    const labels = labelsText(hit.labels);
    if (labels) caption.append(el("span", { class: "item-labels", text: labels }));
    list.append(el("li", { class: "hit", "data-id": String(hit.id), "data-score": String(hit.score) },
      el("figure", {}, img, caption), el("div", { class: "actions" }, more, tag)));
    if (observer) observer.observe(img);
  }
}

document.addEventListener("DOMContentLoaded", start);
