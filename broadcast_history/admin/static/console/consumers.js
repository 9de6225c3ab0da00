// Durable consumers of a channel (GET /consumers?channel=): position, lag and holder.
// A server without that route answers 404: the section then says so and nothing more.

import { ApiError } from "./api.js";
import { $, el, number, time } from "./ui.js";

// `current()` is the channel open when the answer comes: another one's is dropped.
export async function showConsumers(api, channel, current) {
  const box = $("consumers");
  let body;
  try {
    body = await api.json("GET", "/consumers", { query: { channel } });
    if (current() !== channel) return;
  } catch (error) {
    if (current() !== channel) return;
    if (error instanceof ApiError && error.status === 404) {
      box.replaceChildren(el("p", { className: "muted unavailable" }, "Durable consumers are not available on this server."));
      return;
    }
    box.replaceChildren();
    throw error;
  }
  if (!body.consumers.length) {
    box.replaceChildren(el("p", { className: "muted" }, "No durable consumer on this channel."));
    return;
  }
  const head = el("tr", {}, ...["Name", "Epoch", "Position", "Lag", "Updated (UTC)", "Holder"].map((t) => el("th", {}, t)));
  const rows = body.consumers.map((c) =>
    el(
      "tr",
      { dataset: { consumer: c.name } },
      el("td", {}, c.name),
      el("td", { className: "num" }, c.epoch === null ? "—" : String(c.epoch)),
      el("td", { className: "num" }, number(c.position)),
      el("td", { className: `num lag${c.lag ? " behind" : ""}` }, number(c.lag)),
      el("td", {}, time(c.updated_at)),
      el("td", {}, c.holder ?? el("span", { className: "muted" }, "free")),
    ),
  );
  const table = el("table", { id: "consumers-table" }, el("thead", {}, head), el("tbody", {}, ...rows));
  // A page of 1,000 at most: the rest are for the CLI or GET /consumers with `after`.
  const more = body.next_cursor
    ? [el("p", { className: "muted", id: "consumers-more" }, `The first ${number(rows.length)} consumers, by name; the CLI lists them all.`)]
    : [];
  box.replaceChildren(table, ...more);
}
