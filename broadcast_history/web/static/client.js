// broadcast_history browser client: an ES module with no dependencies.
//
//   import { connect } from "/events/client.js";
//   const stream = connect("/events/chat", {
//     onMessage(data, event) { ... },   // data: a string, or a Uint8Array for bytes
//     onReset(reset) { ... },           // {reason, epoch, head, id}: reload your state
//   });
//
// The id of the last event handled ("<epoch>:<offset>"; before the first, of where the
// stream started) is kept in localStorage, so a reloaded page, or one whose server
// restarted, resumes right after it: nothing is lost and nothing comes twice. When
// the server cannot serve that position (the channel was deleted, trimmed, or the id
// is from elsewhere) it says so with a reset and goes on from its head.

const FIRST_DELAY = 500; // ms before the first WebSocket reconnect
const MAX_DELAY = 15000; // backoff cap
const STEADY = 5000; // a connection open this long resets the backoff
const SILENCE_MARGIN = 3000; // ms past two ping intervals before a silent connection is dropped
const FINAL_STATUSES = [400, 401, 403, 422]; // refusals that asking again will not change
const PROBE_TIMEOUT = 5000; // ms the request asking why a stream did not open may take

function decodeBase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i += 1) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// The bytes of an ArrayBuffer or of any view of one (a Uint16Array too, byte for
// byte: new Uint8Array(view) would convert its values one by one).
function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return new Uint8Array(data);
}

// Why the server refused: the `detail` of a JSON answer, or the text of a plain
// one (an HTTPException of authorize); "" when it says neither.
async function answerDetail(response) {
  const text = await response.text();
  try {
    const detail = JSON.parse(text).detail;
    if (detail) return String(detail);
  } catch {
    // Not JSON.
  }
  const plain = (response.headers.get("content-type") || "").startsWith("text/plain");
  return plain ? text.trim() : "";
}

function encodeBase64(bytes) {
  let raw = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    raw += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(raw);
}

// "<epoch>:<offset>" (or a bare offset) as [epoch or null, offset].
function parseId(id) {
  const colon = id.lastIndexOf(":");
  if (colon < 0) return [null, Number(id)];
  return [Number(id.slice(0, colon)), Number(id.slice(colon + 1))];
}

function storage(key) {
  let memory = null;
  return {
    load() {
      if (key !== null) {
        try {
          const stored = localStorage.getItem(key);
          if (stored) memory = stored;
        } catch {
          // No localStorage (privacy mode, sandboxed frame): keep the id in memory.
        }
      }
      return memory;
    },
    save(id) {
      memory = id;
      if (key === null) return;
      try {
        localStorage.setItem(key, id);
      } catch {
        // As above: the id is still kept in memory.
      }
    },
  };
}

/**
 * Stream a channel and resume it across reconnects, reloads and server restarts.
 *
 * @param {string} url The channel's URL in the streaming app, e.g. "/events/chat";
 *   its query string may hold `history=N` or `since=...` for the very first start, or
 *   `last_event_id=...` to start after that id whatever is stored.
 * @param {object} options
 * @param {(data: string|Uint8Array, event: object) => void} options.onMessage Each
 *   event, once, in order; `event` has `id`, `epoch`, `offset` (and over WebSocket
 *   `channel` and `timestamp`).
 * @param {(reset: object) => void} [options.onReset] The position could not be
 *   served: `{reason, epoch, head, id}`; the stream goes on after `head`.
 * @param {string|null} [options.storageKey] localStorage key of the last id (default:
 *   one per URL); `null` keeps it in memory only.
 * @param {"sse"|"ws"} [options.transport] Server-Sent Events (default) or WebSocket.
 * @param {(status: string, detail?: string) => void} [options.onStatus] "connecting",
 *   "open", "reconnecting" or "closed" (with the server's reason when it refused the
 *   stream: it is not asked again).
 * @returns {{close(): void, publish(data, options?): Promise<object>, readonly lastEventId: string|null}}
 */
export function connect(url, options = {}) {
  const { onMessage = () => {}, onReset = () => {}, onStatus = () => {} } = options;
  const transport = options.transport ?? "sse";
  if (transport !== "sse" && transport !== "ws") {
    throw new Error(`transport must be "sse" or "ws", not ${transport}`);
  }
  const base = new URL(url, globalThis.location?.href);
  // An id in the URL is where the caller wants to start: it wins over the stored one.
  const given = base.searchParams.get("last_event_id");
  base.searchParams.delete("last_event_id");
  // One stored position per channel: the query may hold a token, and a new token
  // must resume where the last one was, not start over (nor leave a key per token).
  const key =
    options.storageKey === undefined
      ? `broadcast_history:${base.origin}${base.pathname}`
      : options.storageKey;
  const store = storage(key);
  let last = given || store.load(); // the id of the last event handled
  let closed = false;
  let source = null; // the EventSource or WebSocket in use
  let timer = null;
  let attempts = 0;
  let openedAt = 0;
  const acks = []; // resolvers of WebSocket publishes, in order
  let pingEvery = 0; // ms between the server's pings when idle (it says, with ?pings=1)
  let quiet = null; // timer: the connection said nothing, not even a ping, for too long
  let refusal = ""; // the detail of an error frame that no publish waits for

  function report(error) {
    setTimeout(() => {
      throw error;
    });
  }

  function startUrl() {
    const target = new URL(base);
    if (last) target.searchParams.set("last_event_id", last);
    // Pings the page can see: a connection gone silent without closing (a NAT or a
    // proxy that dropped it, a network switched) is then noticed, where a socket
    // that only receives would wait for ever.
    target.searchParams.set("pings", "1");
    return target;
  }

  // Something came on the connection (with `keepalive`: a ping saying how often they
  // come): silence is measured from now.
  function heard(keepalive) {
    if (keepalive) pingEvery = keepalive * 1000;
    hush();
    if (pingEvery) quiet = setTimeout(silent, 2 * pingEvery + SILENCE_MARGIN);
  }

  function hush() {
    if (quiet !== null) clearTimeout(quiet);
    quiet = null;
  }

  function silent() {
    quiet = null;
    const current = source;
    if (closed || !current) return;
    source = null; // its own close or error event is then ignored
    current.close();
    for (const pending of acks.splice(0)) pending.reject(new Error("the connection went silent"));
    settle();
    retryLater();
  }

  function handleEvent(data, event) {
    if (last) {
      const [epoch, offset] = parseId(last);
      // The server never repeats an event; checked anyway, so a handler never sees
      // one twice.
      if (epoch === event.epoch && event.offset <= offset) return;
    }
    try {
      onMessage(data, event);
    } catch (error) {
      report(error);
    }
    last = event.id;
    store.save(last);
  }

  // Where a stream starts, sent before any event. A client that has seen none yet
  // (started live on a quiet channel) resumes from there: from the head at the next
  // connection, it would skip what was published meanwhile.
  function handleStart(id) {
    if (last || !id) return;
    last = id;
    store.save(last);
  }

  function handleReset(reset) {
    last = reset.id;
    store.save(last);
    try {
      onReset(reset);
    } catch (error) {
      report(error);
    }
  }

  function retryLater() {
    if (closed) return;
    // Capped exponential backoff with jitter: a restarted server is not stampeded.
    const ceiling = Math.min(MAX_DELAY, FIRST_DELAY * 2 ** attempts);
    attempts += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    onStatus("reconnecting", `retrying in ${Math.round(delay)} ms`);
    timer = setTimeout(open, delay);
  }

  function openSse() {
    const es = new EventSource(startUrl());
    source = es;
    const fromId = (id) => {
      const [epoch, offset] = parseId(id);
      return { id, epoch, offset };
    };
    // Each listener says the connection is alive first (heard), whatever follows.
    const on = (type, handle) => es.addEventListener(type, (e) => (heard(), handle(e)));
    on("message", (e) => handleEvent(e.data, { ...fromId(e.lastEventId), type: "message" }));
    on("binary", (e) => handleEvent(decodeBase64(e.data), { ...fromId(e.lastEventId), type: "binary" }));
    on("reset", (e) => handleReset({ ...JSON.parse(e.data), id: e.lastEventId }));
    on("start", (e) => handleStart(e.lastEventId));
    es.addEventListener("ping", (e) => heard(JSON.parse(e.data).keepalive));
    // authorize, asked again while the stream was open, said no (the app's recheck):
    // as a refusal at the start, the stream is not asked again.
    es.addEventListener("refused", (e) => {
      if (source !== es) return;
      hush();
      es.close();
      source = null;
      closed = true;
      let detail = "";
      try {
        detail = String(JSON.parse(e.data).detail || "");
      } catch {
        // Not this server's frame: closed all the same.
      }
      onStatus("closed", detail || "refused");
    });
    es.onopen = () => {
      openedAt = Date.now();
      heard();
      onStatus("open");
    };
    es.onerror = () => {
      if (source !== es) return;
      hush();
      // Closed and opened again from the last id with the backoff: left to itself,
      // EventSource tries again every second (the server's retry:) for as long as the
      // server is away, a thousand pages a thousand times a second.
      es.close();
      source = null;
      const opened = openedAt !== 0;
      settle();
      if (opened) retryLater();
      else refusedOrRetry(es.url);
    };
  }

  // An EventSource that never opened does not say why: an HTTP error and a server
  // that is away look alike. The same request by fetch tells them apart, so a
  // refusal (authorize's 403 or 401, a bad channel's 400) closes the
  // stream with the server's reason, as a WebSocket's 1008 and 4400 do, instead of
  // being asked again for ever. A 422 is a start position the server cannot parse.
  async function refusedOrRetry(target) {
    const asking = new AbortController();
    // A server that takes the request and never answers (overloaded, a proxy
    // waiting on it) must not leave the stream waiting for ever: tried again.
    const giveUp = setTimeout(() => asking.abort(), PROBE_TIMEOUT);
    let reason = null;
    try {
      const response = await fetch(target, {
        headers: { Accept: "text/event-stream" },
        cache: "no-store",
        signal: asking.signal,
      });
      if (FINAL_STATUSES.includes(response.status)) {
        reason = (await answerDetail(response)) || `HTTP ${response.status}`;
      }
    } catch {
      // Unreachable too: tried again with the backoff.
    } finally {
      clearTimeout(giveUp);
      asking.abort(); // a stream that opened this time is not read
    }
    if (closed || source !== null || timer !== null) return;
    if (reason === null) {
      retryLater();
      return;
    }
    closed = true;
    onStatus("closed", reason);
  }

  // Only a connection that opened and held resets the backoff; one that never
  // opened (the server is down) keeps growing it.
  function settle() {
    if (openedAt && Date.now() - openedAt > STEADY) attempts = 0;
    openedAt = 0;
  }

  function openWs() {
    const target = startUrl();
    target.pathname += "/ws";
    target.protocol = target.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(target);
    source = ws;
    ws.onopen = () => {
      openedAt = Date.now();
      heard();
      onStatus("open");
    };
    ws.onmessage = (e) => {
      if (source !== ws) return; // dropped as silent: a new one is on its way
      const frame = JSON.parse(e.data);
      heard(frame.type === "ping" ? frame.keepalive : undefined);
      if (frame.type === "message") {
        const data = frame.encoding === "base64" ? decodeBase64(frame.data) : frame.data;
        const { type, data: _, encoding, ...event } = frame;
        handleEvent(data, { ...event, type: encoding === "base64" ? "binary" : "message" });
      } else if (frame.type === "start") {
        handleStart(frame.id);
      } else if (frame.type === "reset") {
        const { type, ...reset } = frame;
        handleReset(reset);
      } else if (frame.type === "ack" || frame.type === "error") {
        const pending = acks.shift();
        if (pending && frame.type === "ack") pending.resolve(frame);
        else if (pending) pending.reject(new Error(frame.detail));
        else if (frame.type === "error") refusal = frame.detail;
      }
    };
    ws.onclose = (e) => {
      if (source !== ws) return;
      source = null;
      hush();
      for (const pending of acks.splice(0)) pending.reject(new Error("the connection closed"));
      settle();
      if (closed) return;
      if (e.code === 1008 || e.code === 4400) {
        // Refused (authorization) or a bad request: trying again will not help.
        closed = true;
        onStatus("closed", e.reason || refusal || `closed with code ${e.code}`);
        return;
      }
      retryLater();
    };
  }

  function open() {
    timer = null;
    if (closed) return;
    onStatus("connecting");
    if (transport === "ws") openWs();
    else openSse();
    heard(); // a connection that never opens is dropped as a silent one is
  }

  async function publishHttp(data, key) {
    const headers = {
      "Content-Type": typeof data === "string" ? "text/plain; charset=utf-8" : "application/octet-stream",
    };
    if (key) headers["Idempotency-Key"] = key;
    const response = await fetch(base, { method: "POST", headers, body: data });
    if (response.ok) return response.json();
    throw new Error((await answerDetail(response)) || `HTTP ${response.status}`);
  }

  open();
  return {
    get lastEventId() {
      return last;
    },
    /** Publish `data` (a string or bytes) on the channel; resolves with its id. */
    publish(data, { key } = {}) {
      const binary = data instanceof ArrayBuffer || ArrayBuffer.isView(data);
      const blob = typeof Blob !== "undefined" && data instanceof Blob;
      if (typeof data !== "string" && !binary && !blob) {
        // Stored as something else: a number as zero bytes over WebSocket, as its
        // text over POST; an object as "[object Object]".
        return Promise.reject(new TypeError("publish takes a string, bytes or a Blob"));
      }
      const open = transport === "ws" && source instanceof WebSocket && source.readyState === WebSocket.OPEN;
      // A Blob's bytes are read asynchronously: fetch sends them as they are.
      if (!open || blob) {
        return publishHttp(data, key);
      }
      const frame = { type: "publish", data, ...(key ? { key } : {}) };
      if (typeof data !== "string") {
        frame.data = encodeBase64(asBytes(data));
        frame.encoding = "base64";
      }
      return new Promise((resolve, reject) => {
        acks.push({ resolve, reject });
        source.send(JSON.stringify(frame));
      });
    },
    /** Stop for good (the last id stays stored). */
    close() {
      closed = true;
      hush();
      if (timer !== null) clearTimeout(timer);
      const current = source;
      source = null; // its close event is then ignored: the acks end here
      if (current) current.close();
      for (const pending of acks.splice(0)) pending.reject(new Error("the stream was closed"));
      onStatus("closed");
    },
  };
}
