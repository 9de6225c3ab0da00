// The event browser: pages of stored events, newest at the top, moving both ways with
// the API's cursors (`before` for older pages, `after` for newer ones) and an optional
// time window (`since` inclusive, `until` exclusive) kept for every page.

import { channelPath } from "./api.js";
import { $, copyButton, el, isoTime, message, notice, number, time } from "./ui.js";

export class EventBrowser {
  constructor(api, onError) {
    this.api = api;
    this.onError = onError;
    this.channel = null;
    this.filter = {};
    this.older = null; // `before` of the next older page, null when none
    this.newer = null; // `after` of the next newer page, null when none
    this.asked = 0; // requests made: only the latest one's answer is shown
  }

  open(channel) {
    this.channel = channel;
    const form = $("filter");
    form.elements.since.value = form.elements.until.value = ""; // the page size stays
    return this.applyFilter();
  }

  // The filter form's values, kept for every page until applied again.
  applyFilter() {
    const form = new FormData($("filter"));
    this.filter = {
      since: isoTime(form.get("since")),
      until: isoTime(form.get("until")),
      limit: form.get("limit"),
    };
    return this.load("newest");
  }

  async load(move) {
    const query = { ...this.filter };
    if (move === "newest" || move === "older") query.order = "desc";
    if (move === "oldest" || move === "newer") query.order = "asc";
    if (move === "older") query.before = this.older;
    if (move === "newer") query.after = this.newer;
    const asked = ++this.asked;
    const page = await this.api.json("GET", channelPath(this.channel, "/events"), { query });
    if (asked !== this.asked) return; // a later click (or another channel) won
    const events = page.order === "asc" ? page.events.reverse() : page.events;
    if (!events.length && (move === "older" || move === "newer")) {
      notice(`No ${move} events.`);
      if (move === "older") this.older = null;
      else this.newer = null;
      this.showPager();
      return;
    }
    notice("");
    const top = events.length ? events[0].offset : null;
    const bottom = events.length ? events[events.length - 1].offset : null;
    if (page.order === "desc") {
      this.older = page.next_cursor;
      this.newer = move === "older" ? top : null;
    } else {
      this.newer = page.next_cursor;
      this.older = move === "newer" ? bottom : null;
    }
    this.show(events, top, bottom);
  }

  show(events, top, bottom) {
    $("events").tBodies[0].replaceChildren(...events.map((event) => this.row(event)));
    const where = this.filter.since || this.filter.until ? " in the time window" : "";
    $("page-info").textContent = events.length
      ? `offsets ${number(top)} – ${number(bottom)} (${number(events.length)} events)`
      : `no events${where}`;
    this.showPager();
  }

  showPager() {
    for (const button of document.querySelectorAll("[data-page]")) {
      const move = button.dataset.page;
      button.disabled = (move === "older" && this.older === null) || (move === "newer" && this.newer === null);
    }
  }

  row(event) {
    const id = `${event.epoch}:${event.offset}`;
    return el(
      "tr",
      { dataset: { offset: String(event.offset) } },
      el("td", { className: "num offset" }, String(event.offset)),
      el("td", { className: "time" }, time(event.timestamp, { ms: true })),
      el("td", { className: "key" }, event.key ?? ""),
      el("td", {}, message(event)),
      el("td", {}, copyButton(id, this.onError)),
    );
  }
}
