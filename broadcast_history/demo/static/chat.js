// The chat page: one live stream per room (SSE or WebSocket) that resumes from the
// last position seen ("<epoch>:<offset>"), so a dropped connection loses nothing.
// Offsets are also checked here: a message at or below the last offset is a duplicate
// and is dropped; one that skips an offset would be a gap and is counted (never happens).
"use strict";

const $ = (id) => document.getElementById(id);

const chat = {
  room: "lobby",
  transport: "sse",
  source: null,        // the EventSource or WebSocket in use
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

function handle(item) {
  switch (item.type) {
    case "reset":
      clearRoom();
      notice(`This room was reset while you were away; starting over. (${item.reason})`);
      break;
    case "ready":
      if (chat.epoch === null && item.position) {
        const [epoch, offset] = item.position.split(":").map(Number);
        chat.epoch = epoch;
        chat.last = offset;
        chat.oldest = offset + 1;
      }
      $("older").hidden = chat.oldest !== null && chat.oldest <= 1;
      setState("catching-up");
      break;
    case "live":
      setState("live");
      break;
    case "message":
      receive(item);
      break;
    case "error":
      notice(item.detail);
      break;
  }
  showStats();
}

function receive(item) {
  if (chat.epoch === null) {
    chat.epoch = item.epoch;
    chat.last = item.offset - 1;
    chat.oldest = item.offset;
  }
  if (item.offset <= chat.last) {
    chat.duplicates += 1;
    return;
  }
  if (item.offset !== chat.last + 1) chat.gaps += 1;
  chat.last = item.offset;
  chat.received += 1;
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  const caughtUp = item.replayed && chat.reconnects > 0;
  $("messages").append(renderMessage(item, caughtUp ? "caught-up" : null));
  if (atBottom || !item.replayed) log.scrollTop = log.scrollHeight;
  if (!item.replayed) refreshRoomsSoon();
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
  const room = encodeURIComponent(chat.room);
  const pos = position();
  chat.dropped = false;
  setState("connecting");
  if (chat.transport === "ws") {
    const url = new URL(`/api/rooms/${room}/ws`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (pos) url.searchParams.set("last", pos);
    const ws = new WebSocket(url);
    chat.source = ws;
    ws.onmessage = (e) => handle(JSON.parse(e.data));
    ws.onclose = () => {
      if (chat.source !== ws || chat.dropped) return;
      // A WebSocket does not come back by itself: do what EventSource would do.
      setState("reconnecting");
      chat.reconnects += 1;
      setTimeout(() => chat.source === ws && !chat.dropped && connect(), 1000);
    };
    return;
  }
  const url = new URL(`/api/rooms/${room}/events`, location.href);
  // When EventSource reconnects by itself it sends Last-Event-ID; a new EventSource
  // (after "Reconnect" or a room switch) starts from ?last= instead.
  if (pos) url.searchParams.set("last", pos);
  const es = new EventSource(url);
  chat.source = es;
  for (const type of ["reset", "ready", "live", "message"]) {
    es.addEventListener(type, (e) => handle(JSON.parse(e.data)));
  }
  es.onerror = () => {
    if (chat.source !== es) return;
    if (es.readyState === EventSource.CLOSED) {
      setState("reconnecting");
      setTimeout(() => chat.source === es && !chat.dropped && connect(), 1000);
    } else {
      setState("reconnecting");
      chat.reconnects += 1;
    }
  };
}

function disconnect() {
  const source = chat.source;
  chat.source = null;
  if (source) source.close();
}

function toggleConnection() {
  if (chat.state === "dropped") {
    chat.reconnects += 1;
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
  const source = chat.source;
  if (source instanceof WebSocket && source.readyState === WebSocket.OPEN) {
    source.send(JSON.stringify({ author, text }));
    return;
  }
  const response = await fetch(`/api/rooms/${encodeURIComponent(chat.room)}/messages`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ author, text }),
  });
  if (!response.ok) notice((await response.json()).detail);
  loadRooms();
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
  const [rooms, info] = await Promise.all([
    fetch("/api/rooms").then((r) => r.json()),
    fetch("/api/info").then((r) => r.json()),
  ]);
  $("backend").textContent = `${info.transport} · ${info.log}`;
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

function openRoom() {
  const params = new URLSearchParams(location.search);
  chat.transport = params.get("transport") === "ws" ? "ws" : "sse";
  $("transport").value = chat.transport;
  chat.room = decodeURIComponent(location.hash.slice(1)) || "lobby";
  $("room-title").textContent = `# ${chat.room}`;
  disconnect();
  clearRoom();
  notice("");
  connect();
  loadRooms();
}

document.addEventListener("DOMContentLoaded", () => {
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
});
