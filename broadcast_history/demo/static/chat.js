// The chat page: one live stream per room through broadcast_history's client.js (SSE
// or WebSocket). The stream resumes from the last position seen ("<epoch>:<offset>"),
// so a dropped connection loses nothing. Offsets are also checked here: a message at
// or below the last offset would be a duplicate, one that skips an offset a gap; both
// are counted (and never happen).
import { connect as stream } from "/api/stream/client.js";

const HISTORY = 50; // messages a fresh page starts with
const $ = (id) => document.getElementById(id);

const chat = {
  room: "lobby",
  transport: "sse",
  source: null,        // the client.js stream in use
  catchUpUntil: 0,     // messages up to this offset arrive as catch-up after a reconnect
  epoch: null,         // epoch of the room the page has read
  last: 0,             // last offset shown (or the start position)
  oldest: null,        // smallest offset shown, for paging back through history
  received: 0,
  duplicates: 0,
  gaps: 0,
  reconnects: 0,
  dropped: false,      // the user pressed "Drop connection"
  state: "connecting",
};
window.chat = chat;   // for the browser test and for curious users

function setState(state) {
  chat.state = state;
  const el = $("conn");
  el.dataset.state = state;
  el.textContent = state.replace("-", " ");
  $("drop").textContent = state === "dropped" ? "Reconnect" : "Drop connection";
}

function position() {
  return chat.epoch === null ? null : `${chat.epoch}:${chat.last}`;
}

function showStats() {
  $("stats").textContent =
    `position ${position() ?? "-"} · received ${chat.received} · ` +
    `duplicates dropped ${chat.duplicates} · gaps ${chat.gaps} · reconnects ${chat.reconnects}`;
}

function renderMessage(item, cls) {
  const li = document.createElement("li");
  li.dataset.offset = item.offset;
  if (cls) li.classList.add(cls);
  const offset = document.createElement("span");
  offset.className = "offset";
  offset.textContent = `#${item.offset}`;
  const author = document.createElement("span");
  author.className = "author";
  author.textContent = item.author;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = item.text;
  const time = document.createElement("time");
  time.className = "time";
  if (item.timestamp) {
    time.dateTime = item.timestamp;
    time.textContent = new Date(item.timestamp).toLocaleTimeString();
  }
  li.append(offset, author, text, time);
  return li;
}

function clearRoom() {
  $("messages").replaceChildren();
  chat.epoch = null;
  chat.last = 0;
  chat.oldest = null;
  $("older").hidden = false;
}

// A chat message is stored as JSON {author, text}; other tools may publish raw text.
function parse(data) {
  let body = null;
  try {
    body = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
  } catch {}
  if (body && typeof body === "object" && typeof body.text === "string") {
    return { author: String(body.author || "?"), text: body.text, sent: body.sent };
  }
  return { author: "?", text: typeof data === "string" ? data : new TextDecoder().decode(data) };
}

function receive(data, event) {
  if (chat.epoch !== event.epoch) {
    chat.epoch = event.epoch;
    chat.last = event.offset - 1;
    if (chat.oldest === null) chat.oldest = event.offset;
  }
  if (event.offset <= chat.last) {
    chat.duplicates += 1;
    return;
  }
  if (event.offset !== chat.last + 1) chat.gaps += 1;
  chat.last = event.offset;
  chat.received += 1;
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  const caughtUp = event.offset <= chat.catchUpUntil;
  const { sent, ...message } = parse(data);
  // Over WebSocket the commit time comes with the event; over SSE, the time sent.
  const item = { ...message, offset: event.offset, timestamp: event.timestamp ?? sent };
  $("messages").append(renderMessage(item, caughtUp ? "caught-up" : null));
  if (atBottom || !caughtUp) log.scrollTop = log.scrollHeight;
  refreshRoomsSoon();
  $("older").hidden = chat.oldest !== null && chat.oldest <= 1;
  showStats();
}

function reset(info) {
  // The room was deleted or trimmed while this page was away: start over from its head.
  clearRoom();
  chat.epoch = info.epoch;
  chat.last = info.head;
  chat.oldest = info.head + 1;
  notice(`This room was reset while you were away; starting over. (${info.reason})`);
  loadOlder();
  showStats();
}

let roomsTimer = null;
function refreshRoomsSoon() {
  // Message counts in the room list follow live traffic, at most once a second.
  if (roomsTimer === null) roomsTimer = setTimeout(() => { roomsTimer = null; loadRooms(); }, 1000);
}

function notice(text) {
  const el = $("notice");
  el.textContent = text;
  el.hidden = !text;
}

function connect() {
  const url = new URL(`/api/stream/${chat.prefix}${chat.room}`, location.href);
  // A fresh page starts with recent history; a reconnecting one after what it showed.
  if (position()) url.searchParams.set("last_event_id", position());
  else url.searchParams.set("history", HISTORY);
  chat.dropped = false;
  chat.source = stream(url, {
    transport: chat.transport,
    storageKey: null, // a reloaded page starts afresh with recent history
    onMessage: receive,
    onReset: reset,
    onStatus(status, detail) {
      if (chat.dropped) return;
      if (status === "open") setState("live");
      else if (status === "reconnecting") {
        if (chat.state !== "reconnecting") chat.reconnects += 1;
        setState("reconnecting");
      } else if (status === "closed" && detail) notice(detail);
      else if (status === "connecting" && chat.state !== "reconnecting") setState("connecting");
      showStats();
    },
  });
}

function disconnect() {
  const source = chat.source;
  chat.source = null;
  if (source) source.close();
}

async function toggleConnection() {
  if (chat.state === "dropped") {
    chat.reconnects += 1;
    // What arrives up to the current head is what this page missed while away.
    const room = encodeURIComponent(chat.room);
    const newest = await fetch(`/api/rooms/${room}/history?limit=1`).then((r) => r.json());
    chat.catchUpUntil = newest.length ? newest[0].offset : 0;
    connect();
  } else {
    chat.dropped = true;
    disconnect();
    setState("dropped");
  }
  showStats();
}

async function send(event) {
  event.preventDefault();
  const text = $("text").value;
  const author = $("author").value.trim() || "anonymous";
  localStorage.setItem("bh-author", author);
  if (!text.trim()) return;
  $("text").value = "";
  let failure = null;
  try {
    const response = await fetch(`/api/rooms/${encodeURIComponent(chat.room)}/messages`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ author, text }),
    });
    if (!response.ok) failure = await detail(response);
  } catch {
    failure = "the server cannot be reached: not sent";
  }
  if (failure) {
    // Not sent: give the text back unless something new was typed meanwhile.
    if (!$("text").value) $("text").value = text;
    notice(failure);
    return;
  }
  notice("");
  loadRooms();
}

async function detail(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : `refused (${response.status})`;
  } catch {
    return `refused (${response.status})`;
  }
}

async function loadOlder() {
  const before = chat.oldest ?? chat.last + 1;
  if (before <= 1) {
    $("older").hidden = true;
    return;
  }
  const room = encodeURIComponent(chat.room);
  const response = await fetch(`/api/rooms/${room}/history?before=${before}&limit=20`);
  const page = await response.json();   // newest first
  const list = $("messages");
  for (const item of page) {
    if (item.epoch !== chat.epoch || item.offset >= (chat.oldest ?? Infinity)) continue;
    list.prepend(renderMessage(item, "older"));
    chat.oldest = item.offset;
  }
  if (page.length < 20 || chat.oldest <= 1) $("older").hidden = true;
}

async function loadRooms() {
  const rooms = await fetch("/api/rooms").then((r) => r.json());
  if (!rooms.some((r) => r.room === chat.room)) rooms.unshift({ room: chat.room, messages: 0 });
  $("rooms").replaceChildren(
    ...rooms.map((r) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `#${r.room}`;
      a.className = r.room === chat.room ? "current" : "";
      const name = document.createElement("span");
      name.textContent = r.room;
      const count = document.createElement("span");
      count.className = "muted";
      count.textContent = r.messages;
      a.append(name, count);
      li.append(a);
      return li;
    }),
  );
}

async function showInfo() {
  const info = await fetch("/api/info").then((r) => r.json());
  $("backend").textContent = `${info.transport} · ${info.log}`;
  return info;
}

// The server's rule for room names (broadcast_history/demo/_rooms.py).
const ROOM_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

function roomFromHash() {
  let room;
  try {
    room = decodeURIComponent(location.hash.slice(1));
  } catch {
    room = location.hash.slice(1);
  }
  if (!room || ROOM_NAME.test(room)) return room;
  setTimeout(() => notice(`"${room}" is not a room name (letters, digits, - and _): back to the lobby`));
  return null;
}

function openRoom() {
  const params = new URLSearchParams(location.search);
  chat.transport = params.get("transport") === "ws" ? "ws" : "sse";
  $("transport").value = chat.transport;
  chat.room = roomFromHash() || "lobby";
  $("room-title").textContent = `# ${chat.room}`;
  disconnect();
  clearRoom();
  notice("");
  connect();
  loadRooms();
}

async function start() {
  chat.prefix = (await showInfo()).prefix;
  $("author").value =
    localStorage.getItem("bh-author") || `guest-${Math.floor(Math.random() * 9000 + 1000)}`;
  $("drop").addEventListener("click", toggleConnection);
  $("composer").addEventListener("submit", send);
  $("older").addEventListener("click", loadOlder);
  $("new-room").addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = $("room-name").value;
    $("room-name").value = "";
  });
  $("transport").addEventListener("change", () => {
    const url = new URL(location.href);
    url.searchParams.set("transport", $("transport").value);
    history.replaceState(null, "", url);
    openRoom();
  });
  window.addEventListener("hashchange", openRoom);
  setInterval(loadRooms, 10000);
  openRoom();
}

start();
