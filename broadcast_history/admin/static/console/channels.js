// The channels table. The live rate is worked out here, from how far each channel's
// head moved since the previous refresh: the API reports positions, not rates.

import { $, el, number, shownName, time } from "./ui.js";

const PAGE = 500;

export class Channels {
  constructor(api) {
    this.api = api;
    this.previous = new Map(); // name -> {epoch, head, at}
    this.selected = null;
    this.asked = 0; // requests made: only the latest one's answer is shown
  }

  async refresh() {
    const prefix = $("prefix").value;
    const asked = ++this.asked;
    const page = await this.api.json("GET", "/channels", { query: { prefix, limit: PAGE } });
    // A slower answer to an earlier refresh (another prefix) must not replace it.
    if (asked !== this.asked) return;
    const at = performance.now();
    const rows = page.channels.map((channel) => this.row(channel, this.rate(channel, at)));
    $("channels").tBodies[0].replaceChildren(...rows);
    const shown = `${number(page.channels.length)} channel${page.channels.length === 1 ? "" : "s"}`;
    $("channels-note").textContent = page.next_cursor
      ? `the first ${shown}; narrow the prefix to see others`
      : page.channels.length ? shown : prefix ? "no channel with this prefix" : "no channels yet";
  }

  // Events per second since the last refresh; null for a first sight or a new epoch.
  rate(channel, at) {
    const before = this.previous.get(channel.name);
    this.previous.set(channel.name, { epoch: channel.epoch, head: channel.last_offset, at });
    if (!before || before.epoch !== channel.epoch || at <= before.at) return null;
    return (channel.last_offset - before.head) / ((at - before.at) / 1000);
  }

  row(channel, rate) {
    const link = el("a", { href: `#/channel/${encodeURIComponent(channel.name)}` }, shownName(channel.name));
    const rateText = rate === null ? "—" : `${rate > 0 && rate < 10 ? rate.toFixed(1) : Math.round(rate)}/s`;
    return el(
      "tr",
      { className: channel.name === this.selected ? "selected" : "", dataset: { channel: channel.name } },
      el("td", { className: "name" }, link),
      el("td", { className: "num head" }, number(channel.last_offset)),
      el("td", { className: "num count" }, number(channel.count)),
      el("td", {}, time(channel.first_timestamp)),
      el("td", {}, time(channel.last_timestamp)),
      el("td", { className: "num rate" }, rateText),
    );
  }
}
