// The live tail: GET /channels/{channel}/stream read with fetch() (see sse.js). When
// the connection drops it reconnects with `Last-Event-ID: <epoch>:<offset>` of the
// last event shown (before the first, of where the stream started), so the server
// replays what was missed from the log: nothing lost, nothing twice. A position the
// server cannot serve (the channel was deleted or trimmed meanwhile) comes as one
// `reset` event, shown as a row; the tail goes on.

import { ApiError, channelPath } from "./api.js";
import { $, el, message, time } from "./ui.js";
import { readEvents } from "./sse.js";

const FIRST_DELAY = 1000;
const MAX_DELAY = 8000;
const MAX_ROWS = 500;

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });

export class Tail {
  constructor(api, onError) {
    this.api = api;
    this.onError = onError;
    this.controller = null;
    this.channel = null;
    this.reset();
  }

  reset() {
    this.lastId = ""; // "<epoch>:<offset>" of the last event shown
    this.received = 0;
    this.reconnects = 0;
    this.skipped = 0;
  }

  get running() {
    return this.controller !== null;
  }

  start(channel, history) {
    this.stop();
    if (channel !== this.channel) this.clear();
    this.channel = channel;
    this.reset();
    this.controller = new AbortController();
    this.run(channel, history, this.controller.signal);
  }

  stop(state = "stopped", why = "") {
    if (this.controller) this.controller.abort();
    this.controller = null;
    this.setState(state, why);
  }

  clear() {
    $("tail").replaceChildren();
  }

  setState(state, why = "") {
    const badge = $("tail-state");
    badge.dataset.state = state;
    badge.textContent = state;
    badge.title = why;
    $("tail-toggle").textContent = this.running ? "Stop" : "Start";
    const parts = [`received ${this.received}`, `reconnects ${this.reconnects}`];
    if (this.lastId) parts.unshift(`last id ${this.lastId}`);
    if (why) parts.push(why);
    $("tail-info").textContent = parts.join(" · ");
  }

  async run(channel, history, signal) {
    let base = FIRST_DELAY;
    let delay = base;
    while (!signal.aborted) {
      this.setState(this.lastId ? "reconnecting" : "connecting");
      let why = "the stream ended";
      try {
        const headers = this.lastId ? { "Last-Event-ID": this.lastId } : {};
        const response = await this.api.request("GET", channelPath(channel, "/stream"), {
          query: { history }, headers, signal,
        });
        for await (const item of readEvents(response.body)) {
          // The stream opens with `retry:` once the server has subscribed: it is up.
          if (item.retry !== undefined) base = item.retry;
          delay = base;
          if (item.type === "message") this.receive(item);
          else if (item.type === "reset") this.resetTo(item);
          else if (item.type === "start" && !this.lastId) {
            // Where the stream starts: with no event shown yet, the next connection
            // resumes from here (from the head then, it would skip what came between).
            this.lastId = item.id;
            this.setState("live");
          }
          else this.setState("live");
        }
      } catch (error) {
        if (signal.aborted) return;
        // A refused request (bad token, bad channel name) will not get better by itself.
        if (error instanceof ApiError && error.status >= 400 && error.status < 500) {
          return this.end("failed", error.message);
        }
        why = error.message;
      }
      if (signal.aborted) return;
      this.reconnects += 1;
      this.setState("reconnecting", `${why}; retrying in ${delay / 1000} s`);
      await sleep(delay, signal);
      delay = Math.min(delay * 2, MAX_DELAY);
    }
  }

  receive(item) {
    const event = JSON.parse(item.data);
    const [epoch, offset] = this.lastId ? this.lastId.split(":").map(Number) : [null, null];
    if (event.epoch === epoch && event.offset <= offset) {
      this.skipped += 1; // the server resumes after Last-Event-ID: this should not happen
      return;
    }
    this.lastId = item.id || `${event.epoch}:${event.offset}`;
    this.received += 1;
    this.show(event);
    this.setState("live");
  }

  // The position could not be served: the stream goes on after the channel's head.
  resetTo(item) {
    const info = JSON.parse(item.data);
    this.lastId = item.id;
    const text = `reset (${info.reason}): continuing after offset ${info.head}`;
    $("tail").append(el("li", { className: "reset" }, text));
    this.setState("live", text);
  }

  // The tail stops for a reason the operator must see: in its state line and as an error.
  end(state, why) {
    this.stop(state, why);
    this.onError(new Error(`live tail of ${this.channel} ${state}: ${why}`));
  }

  show(event) {
    const list = $("tail");
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(
      el(
        "li",
        { dataset: { offset: String(event.offset) } },
        el("span", { className: "offset" }, `#${event.offset}`),
        time(event.timestamp, { ms: true }),
        message(event),
      ),
    );
    while (list.children.length > MAX_ROWS) list.firstChild.remove();
    if (atBottom) list.scrollTop = list.scrollHeight;
  }
}
