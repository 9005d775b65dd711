// Libra in the browser: chat and voice over the WebSocket API (/ws, README "WebSocket").
// No framework, no build: the page's state lives in this module, and on window.libra for tests.

const MIC_RATE = 16000; // what the microphone is sent at (the worklet makes sure of it)
const FRAME_MS = 40;
const LEAD_S = 0.1; // playback starts this far ahead: the network's jitter is absorbed there
const MAX_BACKOFF_MS = 30000;

const $ = (id) => document.getElementById(id);
// For tests: played = samples of Libra's voice scheduled, stopped = playbacks cut short by an
// interruption, sent = microphone samples sent.
const libra = { state: "connecting", messages: [], played: 0, stopped: 0, sent: 0 };
window.libra = libra;

// --- who is talking: ?user= / ?token= in the address, else the settings saved before ---------

const params = new URLSearchParams(location.search);
let user = params.get("user") || localStorage.getItem("libra.user") || "guest";
let token = params.get("token") || localStorage.getItem("libra.token") || "";
if (params.has("token")) {
  // A token in the address bar ends up in history and screenshots: keep it in storage instead.
  localStorage.setItem("libra.token", token);
  params.delete("token");
  history.replaceState(null, "", location.pathname + (params.size ? `?${params}` : ""));
}
$("user").value = user;
$("token").value = token;

// --- the socket ----------------------------------------------------------------------------

let ws = null;
let ready = false;
let conversation = null; // from `ready`: a reconnect resumes it
let attempt = 0;
let retryTimer = null;
let mode = "manual";
let voice = true;

function connect() {
  clearTimeout(retryTimer);
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  if (token) url.searchParams.set("token", token);
  const socket = (ws = new WebSocket(url));
  socket.binaryType = "arraybuffer";
  ready = false;
  render();
  socket.onopen = () => {
    const hello = { type: "hello", userId: user, sampleRate: MIC_RATE, mode };
    if (conversation) hello.conversation = conversation;
    socket.send(JSON.stringify(hello));
  };
  socket.onmessage = (e) => {
    if (socket !== ws) return;
    if (typeof e.data === "string") onMessage(JSON.parse(e.data));
    else onAudio(e.data);
  };
  socket.onclose = (e) => {
    if (socket !== ws) return; // replaced on purpose
    const wasReady = ready;
    ready = false;
    ws = null;
    if (recording) stopTalking(); // (a new socket has no recording to stop)
    render();
    if (e.reason === "idle") {
      // Nobody talked for minutes: connect again when the person is back, not in a loop.
      for (const what of ["pointerdown", "keydown"]) addEventListener(what, wake, { once: true });
      return;
    }
    const delay = Math.min(MAX_BACKOFF_MS, 500 * 2 ** attempt++) * (0.75 + Math.random() / 2);
    retryTimer = setTimeout(connect, delay);
    const retry = `trying again in ${Math.ceil(delay / 1000)} s`;
    if (e.reason) showError("closed", `${e.reason}; ${retry}`);
    // (a refused handshake, a bad token included, looks like any failure to a page)
    else if (!wasReady) showError("offline", `Cannot reach Libra; ${retry}. Is the token right?`);
  };
}

const wake = () => ws || connect();

function reconnect() {
  const old = ws;
  ws = null;
  if (old) old.close(1000, "reconnecting");
  connect();
}

function send(message) {
  if (!ready) return false;
  ws.send(JSON.stringify(message));
  return true;
}

addEventListener("online", wake);

// --- what Libra says -------------------------------------------------------------------------

const turnsSeen = new Set(); // turns whose reply began on this socket (a resume replays it)
const inflight = new Set(); // turns not done yet
const touched = new Set(); // turns this socket said something of
const typed = []; // typed messages not yet admitted or refused, oldest first
const byTurn = new Map(); // "who:turn" -> message
const voiceTurns = new Set();
let hearing = false; // the server's VAD hears the person
let startTries = 0;

function onMessage(m) {
  if (m.turn) touched.add(m.turn);
  switch (m.type) {
    case "ready":
      ready = true;
      attempt = 0;
      conversation = m.conversation;
      serverRate = m.sampleRate;
      voice = m.voice !== false;
      turnsSeen.clear();
      touched.clear();
      hearing = false;
      settleLater(ws);
      hideError();
      break;
    case "listening": // the person started talking: the server stops Libra's reply (barge-in)
      hearing = true;
      stopPlayback();
      break;
    case "heard":
      hearing = false;
      inflight.add(m.turn);
      voiceTurns.add(m.turn);
      break;
    case "transcript":
      inflight.add(m.turn);
      voiceTurns.add(m.turn);
      if (!byTurn.has(`you:${m.turn}`)) addMessage("you", m.text, m.turn, { voice: true });
      break;
    case "accepted": {
      inflight.add(m.turn);
      const msg = !byTurn.has(`you:${m.turn}`) && typed.shift(); // (a resume says it again)
      if (msg) bind(msg, m.turn);
      break;
    }
    case "delta": {
      inflight.add(m.turn);
      let msg = byTurn.get(`libra:${m.turn}`);
      if (!msg) msg = addMessage("libra", "", m.turn);
      if (m.restart || !turnsSeen.has(m.turn)) msg.text = ""; // the reply starts over
      turnsSeen.add(m.turn);
      msg.text += m.content;
      update(msg);
      break;
    }
    case "speaking":
      inflight.add(m.turn);
      speakingTurn = m.turn;
      socketSamples = 0;
      break;
    case "done": {
      inflight.delete(m.turn);
      const msg = byTurn.get(`libra:${m.turn}`) || (m.text && addMessage("libra", "", m.turn));
      if (msg && m.text) msg.text = m.text;
      if (msg && m.interrupted) msg.interrupted = true;
      if (msg) update(msg);
      if (m.interrupted) stopPlayback(m.turn);
      if (speakingTurn === m.turn) speakingTurn = null; // what is queued plays to its end
      break;
    }
    case "error":
      onError(m);
      break;
  }
  render();
}

// After a reconnect the server resumes the reply in progress: a turn it says nothing of soon
// ended unseen, and a typed message it does not admit was lost with the socket.
function settleLater(socket) {
  const turns = [...inflight];
  const sent = [...typed];
  if (!turns.length && !sent.length) return;
  setTimeout(() => {
    if (socket !== ws) return;
    for (const turn of turns) if (!touched.has(turn)) inflight.delete(turn);
    for (const msg of sent.filter((m) => typed.includes(m))) {
      typed.splice(typed.indexOf(msg), 1);
      msg.failed = "not sent: the connection dropped";
      update(msg);
    }
    render();
  }, 5000);
}

function onError(m) {
  // The first `start` of a socket can come before the server has opened the microphone's
  // capture (it opens at the first audio): it is said again while the button is held.
  const early = m.error === "invalid_request" && /\bstart\b/.test(m.message);
  if (early && recording && startTries < 10) {
    startTries++;
    setTimeout(() => recording && send({ type: "start" }), 100);
    return;
  }
  // A typed message refused: at admission (with its turn), or as it came (without one).
  const mine = m.turn
    ? !voiceTurns.has(m.turn) && !byTurn.has(`you:${m.turn}`)
    : ["invalid_request", "too_long", "too_large"].includes(m.error);
  const refused = mine && typed.shift();
  if (refused) {
    refused.failed = m.message || m.error;
    update(refused);
  }
  if (m.turn) inflight.delete(m.turn);
  if (!m.turn) hearing = false;
  showError(m.error, m.message);
}

// --- the chat ------------------------------------------------------------------------------

function addMessage(who, text, turn, more = {}) {
  const msg = { who, text, ...more };
  // (not enumerable: window.libra.messages reads back as plain {who, text, ...} data)
  Object.defineProperty(msg, "el", { value: document.createElement("div") });
  msg.el.className = `msg ${who}`;
  libra.messages.push(msg);
  if (turn) bind(msg, turn);
  $("log").append(msg.el);
  update(msg, who === "you");
  return msg;
}

function bind(msg, turn) {
  msg.turn = turn;
  byTurn.set(`${msg.who}:${turn}`, msg);
}

// Shows msg as it is now; the chat follows the newest line unless the person scrolled up.
function update(msg, scroll = false) {
  const log = $("log");
  const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  msg.el.textContent = msg.text || (msg.who === "libra" ? "…" : "");
  msg.el.classList.toggle("interrupted", !!msg.interrupted);
  msg.el.classList.toggle("voice", !!msg.voice);
  msg.el.classList.toggle("failed", !!msg.failed);
  if (msg.failed) msg.el.title = msg.failed;
  if (scroll || atEnd) log.scrollTop = log.scrollHeight;
}

let errorTimer = null;
function showError(code, message) {
  const box = $("error");
  box.textContent = message || code;
  box.dataset.code = code;
  box.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(hideError, 10000);
}

function hideError() {
  $("error").hidden = true;
}

$("error").onclick = hideError;
addEventListener("pointerdown", () => out && out.resume());

$("compose").onsubmit = (e) => {
  e.preventDefault();
  const input = $("input");
  const text = input.value.trim();
  if (!text) return;
  player(); // a click: the browser lets audio start from here
  if (!send({ type: "text", text })) {
    showError("offline", "Not connected to Libra yet; trying again…");
    return;
  }
  typed.push(addMessage("you", text));
  input.value = "";
  render();
};

$("account").onsubmit = (e) => {
  e.preventDefault();
  const next = $("user").value.trim() || "guest";
  token = $("token").value.trim();
  localStorage.setItem("libra.token", token);
  localStorage.setItem("libra.user", next);
  if (next !== user) conversation = null; // another person: their own conversation
  user = next;
  $("settings").open = false;
  attempt = 0;
  reconnect();
};

// --- Libra's voice: 16-bit PCM frames, scheduled back to back on the AudioContext's clock ----

let serverRate = 24000;
let out = null;
let playHead = 0;
let speakingTurn = null; // the turn whose audio frames are arriving
let socketSamples = 0; // samples of speakingTurn received on this socket
const heardSamples = new Map(); // turn -> samples scheduled (a resume skips them)
const sources = new Set();

function player() {
  if (!out) out = new AudioContext({ latencyHint: "interactive" });
  if (out.state === "suspended") out.resume();
  return out;
}

function onAudio(buffer) {
  if (!speakingTurn) return; // the rest of an interrupted reply
  if (navigator.userActivation && !navigator.userActivation.hasBeenActive) {
    // (a reply resumed as the page loads: the browser plays nothing before a click, and a
    // suspended clock would never finish what was queued)
    return showError("muted", "Click anywhere on the page to hear Libra");
  }
  let pcm = new Int16Array(buffer, 0, buffer.byteLength >> 1);
  const before = socketSamples;
  socketSamples += pcm.length;
  const seen = heardSamples.get(speakingTurn) || 0;
  if (socketSamples <= seen) return; // played already, before the socket dropped
  if (before < seen) pcm = pcm.subarray(seen - before);
  heardSamples.set(speakingTurn, socketSamples);

  const ctx = player();
  const clip = ctx.createBuffer(1, pcm.length, serverRate);
  const samples = clip.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
  const source = ctx.createBufferSource();
  source.buffer = clip;
  source.connect(ctx.destination);
  const at = Math.max(playHead, ctx.currentTime + (sources.size ? 0.02 : LEAD_S));
  source.start(at);
  playHead = at + clip.duration;
  source.turn = speakingTurn;
  sources.add(source);
  source.onended = () => {
    sources.delete(source);
    if (!sources.size) render();
  };
  libra.played += pcm.length;
  render();
}

// Stops Libra's voice at once: one turn's (its reply was interrupted; the next turn's speech
// may be queued behind it already), or all of it (the person talks).
function stopPlayback(turn = null) {
  let stopped = turn === null ? speakingTurn !== null : speakingTurn === turn;
  if (stopped) speakingTurn = null; // frames still on their way are dropped
  for (const source of sources) {
    if (turn !== null && source.turn !== turn) continue;
    source.onended = null;
    source.stop();
    sources.delete(source);
    stopped = true;
  }
  if (!sources.size) playHead = 0;
  if (stopped) libra.stopped++;
}

// --- the microphone: an AudioWorklet sends ~40 ms frames of 16-bit PCM ------------------------

let mic = null; // {ctx, stream, node} while open
let opening = null;
let recording = false; // push-to-talk held (or clicked on)
let started = false; // `start` was said for this recording
let pressedAt = 0;

async function openMic() {
  if (mic) return mic;
  if (opening) return opening;
  // Made now, in the person's click: browsers let an AudioContext run only after a gesture.
  let ctx = new AudioContext({ sampleRate: MIC_RATE, latencyHint: "interactive" });
  ctx.resume(); // (not awaited: without a gesture it would wait forever)
  opening = (async () => {
    let stream;
    try {
      const audio = { channelCount: 1, echoCancellation: true, noiseSuppression: true };
      audio.autoGainControl = true;
      stream = await navigator.mediaDevices.getUserMedia({ audio });
    } catch (err) {
      ctx.close();
      throw err;
    }
    let source;
    try {
      source = ctx.createMediaStreamSource(stream);
    } catch {
      // (older Firefox takes a microphone only at the device's rate: the worklet resamples)
      ctx.close();
      ctx = new AudioContext({ latencyHint: "interactive" });
      ctx.resume();
      source = ctx.createMediaStreamSource(stream);
    }
    await ctx.audioWorklet.addModule("static/mic-worklet.js");
    const node = new AudioWorkletNode(ctx, "libra-pcm16", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { rate: MIC_RATE, frameMs: FRAME_MS },
    });
    // The microphone is open only while it is wanted (held, or hands-free): all of it is sent.
    node.port.onmessage = (e) => {
      if (e.data === "flushed") node.onflushed?.();
      else if (ready) {
        ws.send(e.data);
        libra.sent += e.data.byteLength / 2;
      }
    };
    source.connect(node);
    mic = { ctx, stream, node };
    return mic;
  })();
  try {
    return await opening;
  } finally {
    opening = null;
  }
}

async function closeMic() {
  const m = mic || (opening && (await opening.catch(() => null)));
  if (!m || mic !== m) return;
  mic = null; // (a press during the flush opens a new one)
  // What the worklet holds (a partial frame) is sent before the microphone closes.
  await new Promise((done) => {
    m.node.onflushed = done;
    m.node.port.postMessage("flush");
    setTimeout(done, 300);
  });
  m.stream.getTracks().forEach((t) => t.stop());
  m.node.disconnect();
  await m.ctx.close();
}

function micFailed(err) {
  recording = false;
  setMode("manual");
  const denied = err && err.name === "NotAllowedError";
  showError("microphone", denied ? "Microphone access was refused" : `Microphone: ${err}`);
  render();
}

async function startTalking() {
  if (recording || mode === "auto" || !ready) return;
  player();
  recording = true;
  started = false;
  startTries = 0;
  stopPlayback(); // the person talks over Libra: stop at once (the server does too)
  render();
  try {
    await openMic();
  } catch (err) {
    return micFailed(err);
  }
  if (recording) started = send({ type: "start" });
}

async function stopTalking() {
  if (!recording) return;
  recording = false;
  render();
  await closeMic();
  if (started) send({ type: "stop" });
}

// Hold to talk, or click once to start and once more to send.
$("mic").onpointerdown = (e) => {
  if (e.button !== 0) return;
  if (recording) return void stopTalking();
  pressedAt = performance.now();
  startTalking();
};
$("mic").onpointerup = () => {
  if (recording && performance.now() - pressedAt > 350) stopTalking();
};
$("mic").onkeydown = (e) => {
  if ((e.key === " " || e.key === "Enter") && !e.repeat) {
    e.preventDefault();
    recording ? stopTalking() : startTalking();
  }
};

function setMode(next) {
  if (mode === next) return;
  mode = next;
  send({ type: "mode", mode });
}

$("handsfree").onclick = async () => {
  player();
  if (mode === "auto") {
    setMode("manual");
    hearing = false;
    render();
    await closeMic();
    return;
  }
  if (recording) await stopTalking();
  setMode("auto");
  render();
  try {
    await openMic();
  } catch (err) {
    micFailed(err);
  }
};

$("interrupt").onclick = () => {
  send({ type: "interrupt" });
  stopPlayback();
  render();
};

// --- the visible state ---------------------------------------------------------------------

function currentState() {
  if (!ready) return ws ? "connecting" : "offline";
  if (speakingTurn !== null || sources.size) return "speaking";
  if (recording || hearing) return "listening";
  if (inflight.size) return "thinking";
  return "idle";
}

function render() {
  const state = currentState();
  libra.state = state;
  const badge = $("state");
  badge.dataset.state = state;
  badge.textContent = state;
  const micButton = $("mic");
  micButton.disabled = !ready || !voice || mode === "auto";
  micButton.setAttribute("aria-pressed", String(recording));
  micButton.querySelector(".label").textContent = recording ? "Send" : "Talk";
  const hands = $("handsfree");
  hands.disabled = !ready || !voice;
  hands.setAttribute("aria-pressed", String(mode === "auto"));
  $("interrupt").hidden = state !== "speaking";
}

connect();
