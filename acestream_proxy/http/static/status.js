// The status page: polls /status every few seconds and renders its tables,
// and plays a stream in a <video> element.  Everything from the API is
// written as text (textContent), never as HTML.
"use strict";

const REFRESH_MS = 3000;
const TOKEN_KEY = "aceproxy.adminToken";
// A browser that plays HLS itself (Safari, Chromium on most platforms)
// says so for this type; others get the links for VLC or mpv instead.
const HLS_TYPE = "application/vnd.apple.mpegurl";
const CONTENT_ID = /^[0-9a-fA-F]{40}$/;
// A live playlist is handed to the <video> element once it holds this many
// target durations (RFC 8216 has a player start three of them from the
// end); Chromium's own HLS player fails on a shorter one instead of waiting.
const START_TARGET_DURATIONS = 3;
const PLAYLIST_POLL_MS = 1000;
const PLAYLIST_WAIT_MS = 60000;
// Bitrates are byte counts' change between two polls; closer polls than
// this (a hidden tab catching up) would show noise, so the last rate stays.
const MIN_RATE_INTERVAL = 1.0;

// The previous sample of each stream, for its bitrates: {time, in, out, rateIn, rateOut}.
const samples = new Map();

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

// A token may come in the URL's fragment (#token=...), which browsers never
// send: it is kept for this tab and taken out of the address bar at once.
function takeTokenFromFragment() {
  const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function cell(row, text, field, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  td.dataset.field = field;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function bitrate(bitsPerSecond) {
  if (bitsPerSecond === null || !isFinite(bitsPerSecond)) return "–";
  if (bitsPerSecond >= 1e6) return (bitsPerSecond / 1e6).toFixed(2) + " Mbit/s";
  return (bitsPerSecond / 1e3).toFixed(0) + " kbit/s";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  seconds = Math.floor(seconds);
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  const two = (n) => String(n).padStart(2, "0");
  return (h ? h + ":" + two(m) : String(m)) + ":" + two(s);
}

// Rates from the change since the previous poll; the first time, the
// average since the stream started.
function rates(stream, now) {
  const previous = samples.get(stream.key);
  let rateIn = null, rateOut = null;
  if (previous && now - previous.time >= MIN_RATE_INTERVAL) {
    const dt = now - previous.time;
    rateIn = Math.max(0, stream.bytes_in - previous.in) * 8 / dt;
    rateOut = Math.max(0, stream.bytes_out - previous.out) * 8 / dt;
  } else if (previous) {
    return { in: previous.rateIn, out: previous.rateOut };
  } else if (stream.uptime > 0) {
    rateIn = stream.bytes_in * 8 / stream.uptime;
    rateOut = stream.bytes_out * 8 / stream.uptime;
  }
  samples.set(stream.key, { time: now, in: stream.bytes_in, out: stream.bytes_out,
                            rateIn: rateIn, rateOut: rateOut });
  return { in: rateIn, out: rateOut };
}

function renderEngines(engines) {
  const body = document.querySelector("#engines tbody");
  body.replaceChildren();
  for (const engine of engines) {
    const row = body.insertRow();
    row.dataset.engine = engine.id;
    cell(row, engine.id, "id", "key");
    const health = engine.healthy ? "healthy" : "unhealthy";
    cell(row, health, "health", health);
    cell(row, engine.streams, "streams", "number");
    cell(row, engine.forwarded ? "yes" : "no", "forwarded");
  }
}

function renderStreams(streams, now) {
  const body = document.querySelector("#streams tbody");
  const table = document.getElementById("streams");
  const note = document.getElementById("streams-note");
  body.replaceChildren();
  if (streams === null) {
    table.hidden = true;
    samples.clear();
    note.textContent = "Streams are shown to admins only; this is the aggregate view.";
    return;
  }
  table.hidden = false;
  note.textContent = streams.length ? "" : "No stream is playing.";
  const seen = new Set();
  for (const stream of streams) {
    seen.add(stream.key);
    const rate = rates(stream, now);
    const row = body.insertRow();
    row.dataset.key = stream.key;
    cell(row, stream.key, "key", "key");
    cell(row, stream.container_id, "engine", "key");
    cell(row, stream.status, "status");
    cell(row, stream.health, "health", stream.health);
    cell(row, stream.players, "players", "number");
    cell(row, bitrate(rate.in), "bitrate_in", "number");
    cell(row, bitrate(rate.out), "bitrate_out", "number");
    cell(row, stream.reconnects, "reconnects", "number");
    cell(row, duration(stream.uptime), "uptime", "number");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Play";
    button.addEventListener("click", () => play(stream.key));
    cell(row, "", "play").replaceChildren(button);
  }
  for (const key of samples.keys()) if (!seen.has(key)) samples.delete(key);
}

function renderAccess(admin) {
  const view = document.getElementById("view");
  if (admin) {
    view.textContent = "Admin view: every stream, with its players, bitrates and uptime.";
  } else if (token()) {
    view.textContent = "The admin token was not accepted: aggregate view only.";
  } else {
    view.textContent = "Aggregate view only: stream details are for admins (paste the admin token).";
  }
  view.dataset.admin = admin ? "yes" : "no";
}

function render(status) {
  const health = status.health;
  document.getElementById("summary").textContent =
    "Worker " + health.worker_id + ": " + health.status + " — " +
    health.streams + " streams, " + health.players + " players, " +
    health.engines_healthy + "/" + status.engines.length + " engines healthy, store " +
    health.store + (health.redis ? " (" + health.redis + ")" : "") + ".";
  document.getElementById("summary").className = health.status;
  renderAccess(status.admin);
  renderEngines(status.engines);
  renderStreams(status.streams, status.time);
  document.getElementById("updated").textContent =
    "Updated " + new Date().toLocaleTimeString() + ", every " + REFRESH_MS / 1000 + " s.";
}

// One fetch of /status and its rendering; a failure is shown, not thrown.
async function load() {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  try {
    const response = await fetch("/status", { headers: headers, cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (error) {
    const summary = document.getElementById("summary");
    summary.textContent = "Cannot reach the proxy (" + error.message + ").";
    summary.className = "down";
  }
}

// The polling loop: the next poll is set once this one is over, so that a
// slow proxy is never asked twice at once.
async function refresh() {
  await load();
  setTimeout(refresh, REFRESH_MS);
}

function setUpTokenForm() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value.trim()) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    load();
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    load();
  });
}

// The stream's two addresses on this proxy: the HLS playlist, which the
// <video> element plays, and the MPEG-TS stream, for VLC or mpv.  Neither
// needs the admin token: they are what any player asks for.
function streamUrls(key) {
  const id = encodeURIComponent(key.toLowerCase());
  return { playlist: "/ace/manifest.m3u8?id=" + id, stream: "/ace/getstream?id=" + id };
}

function showPlayerState(state, text) {
  const line = document.getElementById("player-state");
  line.dataset.state = state;
  line.textContent = text;
}

// The number of the latest play request: a newer one, or Stop, ends an
// older one's wait for its playlist.
let playRequest = 0;

// How long a live playlist is, in its target durations; endless once it has
// ended (a recording plays from its start).
function playlistLength(text) {
  if (/^#EXT-X-ENDLIST/m.test(text)) return Infinity;
  const target = /^#EXT-X-TARGETDURATION:(\d+)/m.exec(text);
  let seconds = 0;
  for (const match of text.matchAll(/^#EXTINF:([0-9.]+)/gm)) seconds += parseFloat(match[1]);
  return target && Number(target[1]) > 0 ? seconds / Number(target[1]) : 0;
}

// The proxy's reason for an answer that is not the playlist: its JSON
// {"error": message}, or the status.
async function refusal(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (error) {
    // not JSON: the status says it
  }
  return "HTTP " + response.status;
}

// Ask for the playlist (which starts the stream) until it is long enough
// to start playing; true then, false when it failed or a newer request or
// Stop came first.  A 503 (no segment yet, no engine yet) is asked again.
async function playlistReady(url, request) {
  const deadline = Date.now() + PLAYLIST_WAIT_MS;
  while (request === playRequest) {
    let response;
    try {
      response = await fetch(url, { cache: "no-store" });
    } catch (error) {
      showPlayerState("error", "Cannot reach the proxy (" + error.message + ").");
      return false;
    }
    if (request !== playRequest) return false;
    if (response.ok && playlistLength(await response.text()) >= START_TARGET_DURATIONS) {
      return request === playRequest;
    }
    if (!response.ok && response.status !== 503) {
      showPlayerState("error", "The proxy cannot play this stream: " +
        await refusal(response) + ".");
      return false;
    }
    if (Date.now() >= deadline) {
      showPlayerState("error", "The stream did not start in " + PLAYLIST_WAIT_MS / 1000 +
        " s" + (response.ok ? "" : ": " + await refusal(response)) + ".");
      return false;
    }
    showPlayerState("starting", "Starting the stream…");
    await new Promise((resolve) => setTimeout(resolve, PLAYLIST_POLL_MS));
  }
  return false;
}

// Play the stream of content id `key`: in the <video> element when this
// browser plays HLS, otherwise only offer the links.
async function play(key) {
  const video = document.getElementById("video");
  if (!CONTENT_ID.test(key)) {
    showPlayerState("invalid", "A content id is 40 hexadecimal digits.");
    return;
  }
  const request = ++playRequest;
  const urls = streamUrls(key);
  for (const [id, path] of [["link-playlist", urls.playlist], ["link-stream", urls.stream]]) {
    const link = document.getElementById(id);
    link.href = path;
    link.title = new URL(path, location.href).href;
  }
  document.getElementById("play-id").value = key.toLowerCase();
  document.getElementById("player").hidden = false;
  if (!video.canPlayType(HLS_TYPE)) {
    unload(video);
    video.hidden = true;
    showPlayerState("unsupported",
      "This browser does not play HLS: open the playlist or the stream in VLC or mpv.");
    return;
  }
  unload(video);
  video.hidden = false;
  showPlayerState("starting", "Starting the stream…");
  if (!(await playlistReady(urls.playlist, request))) return;
  showPlayerState("loading", "Loading " + key.toLowerCase() + "…");
  video.src = urls.playlist;
  // Refused autoplay leaves the controls to start it; the state says so.
  // A stream that fails is told by the element's error event instead.
  video.play().catch((error) => {
    if (error.name === "NotAllowedError" && video.getAttribute("src")) {
      showPlayerState("paused", "Press play to start.");
    }
  });
}

// Stop playing: the element lets go of the stream, so this browser is no
// longer one of its players.
function unload(video) {
  video.pause();
  video.removeAttribute("src");
  video.load();
}

function stop() {
  playRequest++;
  unload(document.getElementById("video"));
  document.getElementById("player").hidden = true;
  showPlayerState("stopped", "");
}

// What the element is doing, in words: its picture size once known, and
// how far it has played.
function describeVideo(video, event) {
  if (!video.getAttribute("src")) return;
  if (event.type === "error") {
    const error = video.error;
    showPlayerState("error", "Cannot play this stream" +
      (error ? " (" + (error.message || "media error " + error.code) + ")." : "."));
  } else if (event.type === "waiting") {
    showPlayerState("waiting", "Waiting for the stream…");
  } else if (video.readyState >= HTMLMediaElement.HAVE_CURRENT_DATA) {
    showPlayerState(video.paused ? "paused" : "playing",
      (video.paused ? "Paused: " : "Playing: ") + video.videoWidth + "×" + video.videoHeight +
      ", " + video.currentTime.toFixed(1) + " s.");
  }
}

function setUpPlayer() {
  const video = document.getElementById("video");
  for (const type of ["loadeddata", "playing", "pause", "timeupdate", "waiting", "error"]) {
    video.addEventListener(type, (event) => describeVideo(video, event));
  }
  document.getElementById("play-form").addEventListener("submit", (event) => {
    event.preventDefault();
    play(document.getElementById("play-id").value.trim());
  });
  document.getElementById("play-stop").addEventListener("click", stop);
}

takeTokenFromFragment();
setUpTokenForm();
setUpPlayer();
refresh();
