// Libra's turn pages: read /api/turns with the service key and draw what it answers.
// Text goes in with textContent only: summaries are people's words.
"use strict";

const KEY = "libra.serviceKey";

function serviceKey() {
  const url = new URL(location.href);
  const given = url.searchParams.get("key");
  if (given) {
    localStorage.setItem(KEY, given);
    url.searchParams.delete("key");
    history.replaceState(null, "", url); // out of the address bar, the history and bookmarks
  }
  return localStorage.getItem(KEY) || "";
}

class ApiError extends Error {
  constructor(status, body) {
    super(`${status} ${body.error || ""}: ${body.message || "no answer"}`);
    this.status = status;
  }
}

async function api(path) {
  const key = serviceKey();
  const response = await fetch(path, { headers: key ? { "X-API-Key": key } : {} });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

const ms = (value) => (value === null || value === undefined ? "—" : `${value.toFixed(1)} ms`);

function row(cells, head = false) {
  return el("tr", {}, ...cells.map((c) => (c instanceof Node ? c : el(head ? "th" : "td", { text: c }))));
}

function num(text) {
  return el("td", { class: "num", text });
}

function bar(from, to, span) {
  const track = el("div", { class: "track" });
  const shown = el("div", { class: "bar" });
  // CSSOM, not a style attribute: the page's policy allows no inline style.
  shown.style.left = `${(100 * from) / span}%`;
  shown.style.width = `${(100 * Math.max(0, to - from)) / span}%`;
  track.append(shown);
  return track;
}

// The events as `libra trace` draws them: each under its cause, all but the first and last
// of a run of deltas folded into a count.
function causalRows(events) {
  const byId = new Map(events.map((e) => [e.id, e]));
  const children = new Map();
  const roots = [];
  for (const e of events) {
    if (e.causation && byId.has(e.causation)) {
      if (!children.has(e.causation)) children.set(e.causation, []);
      children.get(e.causation).push(e);
    } else roots.push(e);
  }
  const rows = [];
  const walk = (e, depth) => {
    rows.push({ event: e, depth, cause: byId.get(e.causation) });
    const kids = children.get(e.id) || [];
    const deltas = kids.filter((k) => k.type === "llm.delta");
    for (const kid of kids) {
      if (deltas.length > 2 && deltas.indexOf(kid) > 0 && kid !== deltas[deltas.length - 1]) continue;
      walk(kid, depth + 1);
      if (deltas.length > 2 && kid === deltas[0]) rows.push({ folded: deltas.length - 2, depth: depth + 1 });
    }
  };
  roots.forEach((r) => walk(r, 0));
  return rows;
}

function drawTimeline(report) {
  const events = report.events;
  const span = Math.max(1, ...events.map((e) => e.ms));
  const box = document.getElementById("timeline");
  for (const r of causalRows(events)) {
    const indent = `${r.depth * 1.1}rem`;
    if (r.folded) {
      const what = el("div", { class: "what", text: `… ${r.folded} more deltas` });
      what.style.paddingLeft = indent;
      box.append(el("div", { class: "event folded" }, el("div", { class: "at" }), what, el("div")));
      continue;
    }
    const e = r.event;
    const what = el(
      "div",
      { class: "what", title: `${e.type} ${e.id}\n${e.summary}` },
      el("span", { class: "type", text: e.type }),
      el("span", { class: "summary", text: e.summary }),
    );
    what.style.paddingLeft = indent;
    const from = r.cause ? r.cause.ms : e.ms;
    box.append(el("div", { class: "event" }, el("div", { class: "at mono", text: ms(e.ms) }), what, bar(from, e.ms, span)));
  }
}

const STAGES = [
  ["capture", "end of speech → captured"],
  ["asr", "captured → transcript"],
  ["admission", "input → admitted or refused"],
  ["first_token", "admitted → first token"],
  ["first_audio", "admitted or end of speech → first audio"],
  ["delivered", "input → delivered"],
  ["total", "input → end of the turn"],
];

function drawStages(stages) {
  const table = document.getElementById("stages");
  const longest = Math.max(1, ...Object.values(stages).filter((v) => v !== null));
  table.append(row(["stage", "", "duration", ""], true));
  for (const [name, meaning] of STAGES) {
    const value = stages[name];
    const track = el("td", { class: "track" });
    if (value !== null && value !== undefined) track.append(bar(0, value, longest));
    table.append(row([el("td", { class: "mono", text: name }), el("td", { text: meaning }), num(ms(value)), track]));
  }
}

function drawAttempts(attempts) {
  const table = document.getElementById("attempts");
  if (!attempts.length) {
    table.append(row(["no provider was asked"]));
    return;
  }
  table.append(row(["provider", "model", "outcome", "time", "first token", ""], true));
  for (const a of attempts) {
    const outcome = a.ok ? `answered${a.cached ? " (cached)" : ""}` : `${a.error} ${a.message || ""}`.trim();
    table.append(
      row([
        a.provider,
        a.model,
        el("td", { class: a.ok ? "ok" : "failed", text: outcome }),
        num(ms(a.ms)),
        num(ms(a.ttft_ms)),
        a.finish_reason ? `finish: ${a.finish_reason}` : "",
      ]),
    );
  }
}

function drawPrompt(prompt) {
  const names = {
    tokens: "prompt tokens (as the provider counted)",
    completion_tokens: "reply tokens",
    input_characters: "the person's input, characters",
    context_messages: "context messages sent with it",
    attachments: "attachments",
  };
  const list = document.getElementById("prompt");
  for (const [key, label] of Object.entries(names)) {
    const value = prompt[key];
    list.append(el("dt", { text: label }), el("dd", { class: "mono", text: value === null ? "—" : String(value) }));
  }
}

async function turnPage() {
  const turn = decodeURIComponent(location.pathname.split("/").pop());
  document.getElementById("turn-id").textContent = turn;
  const report = await api(`/api/turns/${encodeURIComponent(turn)}`);
  document.getElementById("turn-id").textContent = report.turn;
  document.title = `Libra · turn ${report.turn.slice(-8)}`;
  const meta = [report.outcome, report.modality, report.platform, report.user, report.conversation];
  document.getElementById("turn-meta").textContent =
    `${meta.filter(Boolean).join(" · ")} · started ${report.started} · ${report.events.length} events`;
  drawStages(report.stages);
  drawTimeline(report);
  drawAttempts(report.attempts);
  drawPrompt(report.prompt);
}

async function turnsPage() {
  const limit = new URL(location.href).searchParams.get("limit") || "50";
  const { turns } = await api(`/api/turns?limit=${encodeURIComponent(limit)}`);
  const table = document.getElementById("turns");
  table.append(row(["turn", "when", "platform", "user", "outcome", "total"], true));
  for (const t of turns) {
    const link = el("a", { href: `/turns/${encodeURIComponent(t.turn)}`, class: "mono", text: t.turn });
    table.append(
      row([el("td", {}, link), t.at, t.platform || "", t.user, t.outcome, num(ms(t.total_ms))]),
    );
  }
  if (!turns.length) table.append(row(["no turns yet"]));
}

function askForKey(problem) {
  const form = document.getElementById("key-form");
  form.hidden = false;
  problem.textContent += " — give the service key (or open this page with ?key=…)";
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY, new FormData(form).get("key"));
    location.reload();
  });
}

async function main() {
  const problem = document.getElementById("problem");
  try {
    await (document.body.dataset.page === "turn" ? turnPage() : turnsPage());
    document.getElementById("content").hidden = false;
  } catch (error) {
    problem.hidden = false;
    problem.textContent = error.message;
    if (error.status === 401 || error.status === 403) askForKey(problem);
  }
}

main();
