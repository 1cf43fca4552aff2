// vmr page: search -> ranked moments -> watch one (starts at its start, pauses at its end) -> label it.
// Plain JS, no build step. Talks to the JSON API documented at /docs.
"use strict";

const $ = (id) => document.getElementById(id);
const player = $("player");
const view = {
  query: "", hits: [], sel: -1,
  stopAt: null,            // the player pauses here (the selected moment's end)
  edit: null,              // {start, end} window being labelled (drag / inputs)
  mark: { start: null, end: null },
  videosAtSearch: null,
};

async function api(method, url, body) {
  const init = { method, headers: {} };
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const res = await fetch(url, init);
  const data = res.status === 204 ? null : await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new Error((data && data.error) || `${res.status}`);
  return data;
}

const clock = (s) => {
  s = Math.max(0, s); const m = Math.floor(s / 60), r = s - 60 * m;
  return `${m}:${r.toFixed(1).padStart(4, "0")}`;
};
const hitKey = (h) => `${h.video_id}:${h.start}:${h.end}`;

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
async function search(q) {
  q = q.trim();
  if (!q) return;
  view.query = q;
  $("results-info").textContent = "searching…";
  try {
    const data = await api("GET", `/api/search?q=${encodeURIComponent(q)}&top_k=20`);
    view.hits = data.moments;
    view.videosAtSearch = view.videos ?? null;
    const ms = Math.round(1000 * (data.timings.total || 0));
    $("results-info").textContent = `${data.moments.length} moments for “${data.query}” (${ms} ms)`;
    await loadLabels();
    renderHits();
    if (view.hits.length) select(0, false);
  } catch (err) {
    $("results-info").innerHTML = `<span class="error">${escapeHtml(err.message)}</span>`;
  }
}

async function loadLabels() {
  const data = await api("GET", `/api/labels?query=${encodeURIComponent(view.query)}`);
  const byKey = {};
  for (const l of data.labels) {
    if (l.source !== "hit" || l.video_id === null) continue;
    byKey[`${l.video_id}:${l.orig_start ?? l.start}:${l.orig_end ?? l.end}`] = l;
  }
  for (const h of view.hits) h.label = byKey[hitKey(h)] || null;
}

function renderHits() {
  const list = $("results");
  list.innerHTML = "";
  view.hits.forEach((h, i) => {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.index = i; li.dataset.start = h.start; li.dataset.end = h.end;
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
  view.edit = h.label ? { start: h.label.start, end: h.label.end } : { start: h.start, end: h.end };
  $("label-panel").hidden = false;
  showEdit();
  $("now-playing").textContent = `${h.path} · ${clock(h.start)} – ${clock(h.end)}`;
  $("label-state").textContent = h.label ? `labelled: ${h.label.verdict}` : "";
  if (h.playable === false) {
    stopPlayer();
    $("now-playing").innerHTML += ` · <span class="error">${escapeHtml(h.unplayable_reason || "file not served")}</span>`;
    return;
  }
  playRange(h.video_url, h.start, h.end, autoplay);
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
async function verdict(v) {
  const i = view.sel, h = view.hits[i];
  if (!h) return;
  const state = $("label-state");
  try {
    const body = { start: view.edit.start, end: view.edit.end, verdict: v };
    h.label = h.label
      ? await api("PATCH", `/api/labels/${h.label.id}`, body)
      : await api("POST", "/api/labels", { ...body, video_id: h.video_id, query: view.query, source: "hit",
                                           orig_start: h.start, orig_end: h.end, score: h.score });
    state.textContent = `saved: ${v} ${clock(h.label.start)} – ${clock(h.label.end)} (label ${h.label.id})`;
    paintLabel(i);
    pollStatus();
  } catch (err) {
    state.innerHTML = `<span class="error">${escapeHtml(err.message)}</span>`;
  }
}
$("accept").onclick = () => verdict("accept");
$("reject").onclick = () => verdict("reject");
$("replay").onclick = replay;

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
    state.textContent = `saved (label ${l.id})`;
    view.mark = { start: null, end: null }; showMark(); pollStatus();
  } catch (err) {
    state.innerHTML = `<span class="error">${escapeHtml(err.message)}</span>`;
  }
};

// ---- keyboard ------------------------------------------------------------------------------------------------
document.addEventListener("keydown", (e) => {
  const typing = ["INPUT", "TEXTAREA"].includes(e.target.tagName);
  if (typing) { if (e.key === "Escape") e.target.blur(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const actions = {
    j: () => select(view.sel + 1, true), ArrowDown: () => select(view.sel + 1, true),
    k: () => select(view.sel - 1, true), ArrowUp: () => select(view.sel - 1, true),
    r: replay, a: () => verdict("accept"), x: () => verdict("reject"),
    "[": () => setEdge("start", player.currentTime), "]": () => setEdge("end", player.currentTime),
    "/": () => $("q").focus(),
    m: () => { $("mark-panel").open = true; $("mark-query").focus(); },
  };
  if (actions[e.key]) { e.preventDefault(); actions[e.key](); }
});

$("search-form").addEventListener("submit", (e) => { e.preventDefault(); search($("q").value); $("q").blur(); });

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

pollStatus();
setInterval(pollStatus, 3000);
const initial = new URLSearchParams(location.search).get("q");
if (initial) { $("q").value = initial; search(initial); }
