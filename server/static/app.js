// vmr page: search -> ranked moments -> watch one (starts at its start, pauses at its end) -> label it.
// Plain JS, no build step. Talks to the JSON API documented at /docs.
"use strict";

const $ = (id) => document.getElementById(id);
const player = $("player");
const view = {
  query: "", hits: [], sel: -1,
  searchSeq: 0,            // the latest search started: an older one's answer is dropped
  undo: [],                // label changes to undo (u), newest last: {before, after} label states
  stopAt: null,            // the player pauses here (the selected moment's end)
  edit: null,              // {start, end} window being labelled (drag / inputs)
  mark: { start: null, end: null },
  videosAtSearch: null,
  sharedHit: null,         // {video_id, start, end} the address named (?hit=), selected once its search is back
};

// A failed call throws an Error with .status (0: the server could not be reached) and .data (the JSON body).
async function api(method, url, body, headers = {}) {
  const init = { method, headers: { ...headers } };
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  let res;
  try {
    res = await fetch(url, init);
  } catch (_) {
    throw Object.assign(new Error("cannot reach the vmr server (is `vmr serve` still running?)"), { status: 0 });
  }
  const data = res.status === 204 ? null : await res.json().catch(() => ({ error: res.statusText }));
  if (res.status === 401 && url !== "/api/login") showLogin();
  if (!res.ok) throw Object.assign(new Error((data && data.error) || `${res.status}`), { status: res.status, data });
  return data;
}

const clock = (s) => {
  s = Math.max(0, s); const m = Math.floor(s / 60), r = s - 60 * m;
  return `${m}:${r.toFixed(1).padStart(4, "0")}`;
};
const hitKey = (h) => `${h.video_id}:${h.start}:${h.end}`;

// ---- the address holds the search and the selected hit (?q=...&hit=VIDEO:START-END): a link reopens both -------
const hitParam = (h) => `${h.video_id}:${h.start}-${h.end}`;
function parseHitParam(text) {
  const m = /^(\d+):(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)$/.exec(text || "");
  return m ? { video_id: parseInt(m[1], 10), start: parseFloat(m[2]), end: parseFloat(m[3]) } : null;
}

function saveAddress() {
  const params = new URLSearchParams();
  if (view.query) params.set("q", view.query);
  const h = view.hits[view.sel];
  if (h) params.set("hit", hitParam(h));
  else if (view.sharedHit) params.set("hit", hitParam(view.sharedHit));  // not found yet: keep it for a reload
  const query = params.toString();
  history.replaceState(null, "", location.pathname + (query ? `?${query}` : ""));
}

// The hit to select when a search's results arrive: the one the address named (the same video and edges), else
// the hit of that video overlapping it most (a re-index can move edges), else the first.
function sharedHitIndex() {
  const want = view.sharedHit;
  view.sharedHit = null;
  if (!want) return 0;
  const same = (a, b) => Math.abs(a - b) < 1e-3;
  const exact = view.hits.findIndex((h) => h.video_id === want.video_id && same(h.start, want.start) &&
                                           same(h.end, want.end));
  if (exact >= 0) return exact;
  let best = -1, bestOverlap = 0;
  view.hits.forEach((h, i) => {
    const overlap = Math.min(h.end, want.end) - Math.max(h.start, want.start);
    if (h.video_id === want.video_id && overlap > bestOverlap) { best = i; bestOverlap = overlap; }
  });
  if (best < 0) {
    $("results-info").textContent += ` · the linked moment (video ${want.video_id}, ${clock(want.start)} – ` +
      `${clock(want.end)}) is not among these hits`;
  }
  return Math.max(best, 0);
}

// ---- access token: a server bound to anything but localhost asks for it once (kept as a cookie) -------------------
function showLogin() {
  if (!$("login").hidden) return;
  $("login").hidden = false;
  $("token").focus();
}

async function login(token) {
  try {
    const who = await api("POST", "/api/login", { token });
    $("login").hidden = true;
    $("login-state").textContent = "";
    $("user").textContent = who.user ? `· ${who.user}` : "";
    pollStatus();
    if (view.query) search(view.query);
  } catch (err) {
    showLogin();
    $("login-state").innerHTML = `<span class="error">${escapeHtml(err.message)}</span>`;
  }
}
$("login").addEventListener("submit", (e) => { e.preventDefault(); login($("token").value.trim()); });

// ---- status (polled: an ingest may be running) ---------------------------------------------------------------
async function pollStatus() {
  try {
    const s = await api("GET", "/api/status");
    const ing = s.ingest;
    let text = `${s.videos} videos · ${s.labels.total} labels · ${s.reranker ? "reranked" : "coarse only"}`;
    if (ing.running) text += ` · <span class="busy">ingest running: ${ing.done}/${ing.total} files${ing.pending ? `, ${ing.pending} waiting` : ""}</span>`;
    else if (ing.note) text += ` · <span class="warn">${escapeHtml(ing.note)}</span>`;
    $("status").innerHTML = text;
    if (view.videosAtSearch !== null && s.videos !== view.videosAtSearch && view.query) {
      $("results-info").innerHTML = `${s.videos - view.videosAtSearch} new videos since this search — ` +
        `<a href="#" id="again">search again</a>`;
      $("again").onclick = (e) => { e.preventDefault(); search(view.query); };
    }
    view.videos = s.videos;
  } catch (err) {
    $("status").innerHTML = `<span class="error">status: ${err.message}</span>`;
  }
}

// ---- search and the result list ------------------------------------------------------------------------------
// The hits shown are always those of ONE finished search, and each carries that search's sentence and id: while a
// search runs, and after one fails, no hit is listed, so a label can never go to a sentence its hit was not found for.
function clearHits(message) {
  view.hits = []; view.sel = -1; view.edit = null;
  renderHits();
  $("label-panel").hidden = true;
  $("results-info").innerHTML = message;
}

async function search(q) {
  q = q.trim();
  if (!q) { $("results-info").innerHTML = `<span class="error">type a sentence to search for</span>`; return; }
  const seq = ++view.searchSeq;
  view.query = q;
  clearHits(`searching for “${escapeHtml(q)}”…`);
  saveAddress();
  try {
    const data = await api("GET", `/api/search?q=${encodeURIComponent(q)}&top_k=20`);
    const byKey = await labelsOf(data.query);
    if (seq !== view.searchSeq) return;  // a newer search started meanwhile
    view.hits = data.moments.map((h) => ({ ...h, query: data.query, search_id: data.search_id,
                                           label: byKey[hitKey(h)] || null }));
    view.videosAtSearch = view.videos ?? null;
    const ms = Math.round(1000 * (data.timings.total || 0));
    $("results-info").textContent = `${data.moments.length} moments for “${data.query}” (${ms} ms)`;
    renderHits();
    if (view.hits.length) select(sharedHitIndex(), false);
  } catch (err) {
    if (seq !== view.searchSeq) return;
    clearHits(`<span class="error">search failed: ${escapeHtml(err.message)}</span> — ` +
              `<a href="#" id="retry">try again</a>`);
    $("retry").onclick = (e) => { e.preventDefault(); search(q); };
  }
}

// {hitKey: label} of the hits labelled for a sentence (case and spacing aside, as the server compares them)
async function labelsOf(query) {
  const data = await api("GET", `/api/labels?query=${encodeURIComponent(query)}`);
  const byKey = {};
  for (const l of data.labels) {
    if (l.source !== "hit" || l.video_id === null) continue;
    byKey[`${l.video_id}:${l.orig_start ?? l.start}:${l.orig_end ?? l.end}`] = l;
  }
  return byKey;
}

function renderHits() {
  const list = $("results");
  list.innerHTML = "";
  view.hits.forEach((h, i) => {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.index = i; li.dataset.video = h.video_id; li.dataset.start = h.start; li.dataset.end = h.end;
    // a file the server does not serve gets its reason instead of a broken image
    const thumb = h.playable === false
      ? `<div class="no-thumb">${escapeHtml(h.unplayable_reason || "file not served")}</div>`
      : `<img loading="lazy" alt="thumbnail unavailable" src="${h.thumbnail_url}">`;
    li.innerHTML = `${thumb}
      <div><div class="path">${h.rank}. ${escapeHtml(h.path)}</div>
      <div class="meta">${clock(h.start)} – ${clock(h.end)} · score ${h.score.toFixed(3)} · cos ${h.coarse_score.toFixed(3)}</div>
      ${saliencyStrip(h)}</div>`;
    if (h.playable === false) li.classList.add("unplayable");
    li.onclick = () => select(i, true);
    list.appendChild(li);
    paintLabel(i);
  });
}

function saliencyStrip(h) {
  const s = h.saliency || [];
  if (!s.length) return "";
  const lo = Math.min(...s), hi = Math.max(...s), span = hi - lo || 1;
  const cells = s.map((v) => {
    const x = (v - lo) / span;   // dark blue (low) -> yellow (high)
    return `<span style="background:rgb(${Math.round(40 + 210 * x)},${Math.round(60 + 160 * x)},${Math.round(140 - 100 * x)})"></span>`;
  }).join("");
  const [w0, w1] = h.window || [0, 0], wl = (w1 - w0) || 1;
  const left = 100 * (h.start - w0) / wl, width = 100 * (h.end - h.start) / wl;
  return `<div class="strip" title="saliency over the candidate window ${clock(w0)}–${clock(w1)}">${cells}` +
    `<div class="in-moment" style="left:${left}%;width:${width}%"></div></div>`;
}

function paintLabel(i) {
  const li = $("results").children[i];
  if (!li) return;
  const l = view.hits[i].label;
  li.classList.toggle("accepted", !!l && l.verdict === "accept");
  li.classList.toggle("rejected", !!l && l.verdict === "reject");
}

// ---- the player: start at the moment, pause at its end --------------------------------------------------------
function select(i, autoplay) {
  if (i < 0 || i >= view.hits.length) return;
  view.sel = i;
  [...$("results").children].forEach((li, j) => li.classList.toggle("selected", j === i));
  $("results").children[i].scrollIntoView({ block: "nearest" });
  const h = view.hits[i];
  saveAddress();
  view.edit = h.label ? { start: h.label.start, end: h.label.end } : { start: h.start, end: h.end };
  $("label-panel").hidden = false;
  $("label-query").textContent = `“${h.query}”`;
  showEdit();
  $("now-playing").textContent = `${h.path} · ${clock(h.start)} – ${clock(h.end)}`;
  showLabelState(h);
  if (h.playable === false) {
    stopPlayer();
    $("now-playing").innerHTML += ` · <span class="error">${escapeHtml(h.unplayable_reason || "file not served")}</span>`;
    return;
  }
  playRange(h.video_url, view.edit.start, view.edit.end, autoplay);  // an adjusted hit plays as adjusted
}

function stopPlayer() {
  view.stopAt = null;
  player.pause();
  player.removeAttribute("src");
  player.load();
}

function playRange(url, start, end, autoplay) {
  view.stopAt = end;
  const go = () => {
    player.currentTime = start;
    if (autoplay) player.play().catch(() => {});
  };
  if (player.getAttribute("src") !== url) {
    player.setAttribute("src", url);
    player.addEventListener("loadedmetadata", go, { once: true });
    player.load();
  } else {
    go();
  }
}

function replay() {
  const h = view.hits[view.sel];
  if (h && h.playable !== false) playRange(h.video_url, view.edit.start, view.edit.end, true);
}

function enforceStop() {
  if (view.stopAt !== null && !player.paused && player.currentTime >= view.stopAt - 0.03) {
    player.pause();
  }
  drawTimeline();
}
setInterval(enforceStop, 30);
player.addEventListener("timeupdate", enforceStop);
player.addEventListener("seeking", () => {
  // a seek by hand outside the moment means "keep watching": stop enforcing its end
  if (view.stopAt !== null && player.currentTime >= view.stopAt + 0.05) view.stopAt = null;
});

// ---- timeline with draggable start/end handles ---------------------------------------------------------------
function duration() {
  const h = view.hits[view.sel];
  return (isFinite(player.duration) && player.duration) || (h && h.duration) || 1;
}

function drawTimeline() {
  const d = duration();
  $("tl-now").style.left = `${100 * (player.currentTime || 0) / d}%`;
  if (!view.edit) return;
  $("tl-range").style.left = $("tl-start").style.left = `${100 * view.edit.start / d}%`;
  $("tl-end").style.left = `${100 * view.edit.end / d}%`;
  $("tl-range").style.width = `${100 * (view.edit.end - view.edit.start) / d}%`;
}

function showEdit() {
  $("lab-start").value = view.edit.start.toFixed(1);
  $("lab-end").value = view.edit.end.toFixed(1);
  drawTimeline();
  const h = view.hits[view.sel];  // the download is the moment as shown: adjusted edges included
  $("download").hidden = !h || h.playable === false;
  if (h) $("download").href = `/api/videos/${h.video_id}/clip?start=${view.edit.start}&end=${view.edit.end}`;
}

function setEdge(edge, t) {
  if (!view.edit) return;
  t = Math.max(0, Math.min(duration(), Math.round(t * 10) / 10));
  if (edge === "start") view.edit.start = Math.min(t, view.edit.end - 0.1);
  else view.edit.end = Math.max(t, view.edit.start + 0.1);
  showEdit();
}

for (const handle of document.querySelectorAll(".handle")) {
  handle.addEventListener("pointerdown", (e) => {
    handle.setPointerCapture(e.pointerId);
    const box = $("timeline").getBoundingClientRect();
    const move = (ev) => {
      const t = duration() * (ev.clientX - box.left) / box.width;
      setEdge(handle.dataset.edge, t);
      player.currentTime = handle.dataset.edge === "start" ? view.edit.start : view.edit.end;
    };
    handle.onpointermove = move;
    handle.onpointerup = () => { handle.onpointermove = null; };
  });
}
$("lab-start").onchange = () => setEdge("start", parseFloat($("lab-start").value));
$("lab-end").onchange = () => setEdge("end", parseFloat($("lab-end").value));
$("set-start").onclick = () => setEdge("start", player.currentTime);
$("set-end").onclick = () => setEdge("end", player.currentTime);

// ---- labels --------------------------------------------------------------------------------------------------
// Every write names the label version this tab saw (If-Match); a stale tab's write gets 409 with the stored label,
// which is then shown (and a repeat of the key applies the change to it).
const ifMatch = (label) => ({ "If-Match": `"${label.version}"` });
const by = (l) => (l.author ? ` by ${l.author}` : "");

function showLabelState(h, note) {
  const l = h.label;
  const text = l ? `labelled ${l.verdict}${by(l)}: ${clock(l.start)} – ${clock(l.end)} (label ${l.id})` : "not labelled";
  $("label-state").innerHTML = (note ? `${note} · ` : "") + escapeHtml(text);
  $("delete").disabled = !l;
}

// Put a label state (from the server) on the hit that shows it, if that hit is listed.
function showLabel(label) {
  const i = view.hits.findIndex((h) => h.label && h.label.id === label.id ||
    (label.source === "hit" && h.video_id === label.video_id && h.start === label.orig_start &&
     h.end === label.orig_end && h.query.toLowerCase() === label.query.toLowerCase()));
  if (i < 0) return;
  view.hits[i].label = label.deleted_at ? null : label;
  paintLabel(i);
  if (i === view.sel) showLabelState(view.hits[i]);
}

// Run one label write; a 409 (a stale tab, a hit labelled elsewhere) shows the stored label instead.
async function labelWrite(write, done) {
  try {
    const label = await write();
    done(label);
    showLabel(label);
    refreshLabels();
    pollStatus();
    return label;
  } catch (err) {
    const stored = err.status === 409 && err.data && err.data.label;
    if (stored) showLabel(stored);
    $("label-state").innerHTML = `<span class="error">not saved: ${escapeHtml(err.message)}</span> — ` +
      (stored ? "the stored label is shown now; repeat to apply yours" : "repeat to retry");
    return null;
  }
}

async function verdict(v) {
  const h = view.hits[view.sel];
  if (!h || !view.edit) return;
  const before = h.label;
  const body = { start: view.edit.start, end: view.edit.end, verdict: v };
  await labelWrite(() => before
    ? api("PATCH", `/api/labels/${before.id}`, body, ifMatch(before))
    : api("POST", "/api/labels", { ...body, video_id: h.video_id, search_id: h.search_id, query: h.query,
                                   source: "hit", orig_start: h.start, orig_end: h.end, score: h.score }),
  (after) => view.undo.push({ before, after }));
}

async function deleteLabel(label) {
  await labelWrite(() => api("DELETE", `/api/labels/${label.id}`, undefined, ifMatch(label)),
                   (after) => view.undo.push({ before: label, after }));
}

// Undo the newest label change of this tab: a new label is deleted, a deleted one restored, a change reverted.
async function undo() {
  const step = view.undo.pop();
  if (!step) { $("label-state").textContent = "nothing to undo"; return; }
  const { before, after } = step;
  let write;
  if (!before) write = () => api("DELETE", `/api/labels/${after.id}`, undefined, ifMatch(after));
  else if (after.deleted_at) write = () => api("POST", `/api/labels/${after.id}/restore`, {});
  else write = () => api("PATCH", `/api/labels/${after.id}`,
                         { start: before.start, end: before.end, verdict: before.verdict }, ifMatch(after));
  const label = await labelWrite(write, () => {});
  if (label) $("label-state").textContent = `undone: label ${label.id} ${label.deleted_at ? "deleted" : label.verdict}`;
}

$("accept").onclick = () => verdict("accept");
$("reject").onclick = () => verdict("reject");
$("replay").onclick = replay;
$("delete").onclick = () => { const h = view.hits[view.sel]; if (h && h.label) deleteLabel(h.label); };
$("undo").onclick = undo;

// ---- the labels panel: every label and mark of the index ------------------------------------------------------
async function refreshLabels() {
  if (!$("labels-panel").open) return;
  try {
    view.allLabels = (await api("GET", "/api/labels")).labels;
  } catch (err) {
    $("labels-info").innerHTML = `<span class="error">${escapeHtml(err.message)}</span>`;
    return;
  }
  renderLabels();
}

function renderLabels() {
  const text = $("lf-text").value.trim().toLowerCase(), v = $("lf-verdict").value, src = $("lf-source").value;
  const rows = (view.allLabels || []).filter((l) => (!text || l.query.toLowerCase().includes(text) ||
    l.path.toLowerCase().includes(text)) && (!v || l.verdict === v) && (!src || l.source === src)).reverse();
  $("labels-info").textContent = `${rows.length} of ${(view.allLabels || []).length} labels`;
  const body = $("labels-table").tBodies[0];
  body.innerHTML = "";
  for (const l of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = l.id;
    tr.innerHTML = `<td>${escapeHtml(l.query)}</td><td>${escapeHtml(l.path)}</td>` +
      `<td>${clock(l.start)} – ${clock(l.end)}</td><td class="${l.verdict}">${l.verdict}</td><td>${l.source}</td>` +
      `<td>${escapeHtml(l.author || "")}</td><td><button type="button" class="play">Play</button> ` +
      `<button type="button" class="del">Delete</button></td>`;
    tr.querySelector(".play").onclick = () => {
      if (l.video_id !== null) playRange(`/api/videos/${l.video_id}/file`, l.start, l.end, true);
    };
    tr.querySelector(".del").onclick = () => deleteLabel(l);
    body.appendChild(tr);
  }
}
$("labels-panel").addEventListener("toggle", refreshLabels);
for (const id of ["lf-text", "lf-verdict", "lf-source"]) $(id).addEventListener("input", renderLabels);

function currentVideoId() {
  const m = /\/api\/videos\/(\d+)\/file/.exec(player.getAttribute("src") || "");
  return m ? parseInt(m[1], 10) : null;
}
function showMark() {
  const f = (t) => (t === null ? "?" : clock(t));
  $("mark-range").textContent = `${f(view.mark.start)} – ${f(view.mark.end)}`;
}
$("mark-start").onclick = () => { view.mark.start = player.currentTime; showMark(); };
$("mark-end").onclick = () => { view.mark.end = player.currentTime; showMark(); };
$("mark-save").onclick = async () => {
  const state = $("mark-state"), vid = currentVideoId(), q = $("mark-query").value.trim();
  if (vid === null || !q || view.mark.start === null || view.mark.end === null) {
    state.innerHTML = `<span class="error">play a video, write the sentence, set start and end</span>`;
    return;
  }
  try {
    const l = await api("POST", "/api/labels", { video_id: vid, query: q, start: Math.min(view.mark.start, view.mark.end),
                                                 end: Math.max(view.mark.start, view.mark.end), verdict: "accept", source: "mark" });
    state.textContent = `saved: ${clock(l.start)} – ${clock(l.end)} for “${l.query}” (label ${l.id})`;
    view.mark = { start: null, end: null };
    $("mark-range").textContent = "–";
    view.undo.push({ before: null, after: l });
    refreshLabels(); pollStatus();
  } catch (err) {
    state.innerHTML = `<span class="error">${escapeHtml(err.message)}</span>`;
  }
};

// ---- keyboard ------------------------------------------------------------------------------------------------
// Keys act on the page, never on the focused control: after a click on Reject, focus stays on it, and Space (play /
// pause, as in every video player) or Enter must not reject the next hit.
function togglePlay() {
  if (!player.getAttribute("src")) return;
  if (player.paused) player.play().catch(() => {}); else player.pause();
}

document.addEventListener("keydown", (e) => {
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName);
  if (typing) { if (e.key === "Escape") e.target.blur(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const actions = {
    j: () => select(view.sel + 1, true), ArrowDown: () => select(view.sel + 1, true),
    k: () => select(view.sel - 1, true), ArrowUp: () => select(view.sel - 1, true),
    r: replay, a: () => verdict("accept"), x: () => verdict("reject"), " ": togglePlay,
    u: undo, Delete: () => $("delete").click(), d: () => { if (!$("download").hidden) $("download").click(); },
    "[": () => setEdge("start", player.currentTime), "]": () => setEdge("end", player.currentTime),
    "/": () => $("q").focus(),
    m: () => { $("mark-panel").open = true; $("mark-query").focus(); },
  };
  if (actions[e.key]) { e.preventDefault(); actions[e.key](); }
});
// A button clicked with the mouse gives focus back to the page (keyboard activation, e.detail 0, keeps it).
document.addEventListener("click", (e) => {
  const button = e.target.closest && e.target.closest("button");
  if (button && e.detail > 0) button.blur();
});
// A button activates on Space's keyup: cancel that too, so only the page's action happens.
document.addEventListener("keyup", (e) => { if (e.key === " " && e.target.tagName !== "INPUT") e.preventDefault(); });

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  view.sharedHit = null;  // a search typed here is not the one a link named
  search($("q").value);
  $("q").blur();
});

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function start() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token) {  // a link with the token (printed by `vmr serve`): log in, then keep it out of the address bar
    params.delete("token");
    history.replaceState(null, "", location.pathname + (params.toString() ? `?${params}` : ""));
    await login(token);
  }
  pollStatus();
  setInterval(pollStatus, 3000);
  const initial = params.get("q");
  view.sharedHit = initial ? parseHitParam(params.get("hit")) : null;
  if (initial) { $("q").value = initial; search(initial); }
}
start();
