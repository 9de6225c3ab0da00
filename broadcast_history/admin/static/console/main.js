// The operator console: token prompt, refresh loop, routing (#/channel/<name>) and the
// trim and delete actions. The other parts live in their own modules.

import { Api, ApiError, channelPath } from "./api.js";
import { Channels } from "./channels.js";
import { showConsumers } from "./consumers.js";
import { EventBrowser } from "./events.js";
import { Tail } from "./tail.js";
import { $, confirmDialog, el, isoTime, notice, number, resolveError, shownName, showError, time } from "./ui.js";

const TOKEN_KEY = "broadcast_history.token";
const REFRESH_MS = 2000;

// The console is served at <admin app>/ui/, so the API is one level up, wherever the
// admin app is mounted.
const api = new Api(new URL("..", location.href));
const state = { connected: false, channel: null, timer: null };

// Errors go on screen. A 401 is shown in the token prompt it opens instead.
const report = (key) => (error) => {
  if (error.name === "AbortError") return;
  if (error instanceof ApiError && error.status === 401) return;
  showError(key, error);
};

const channels = new Channels(api);
const browser = new EventBrowser(api, report("copy"));
const tail = new Tail(api, report("tail"));

// -- token --------------------------------------------------------------------------

function askToken(reason = "") {
  state.connected = false;
  clearTimeout(state.timer);
  tail.stop();
  const dialog = $("token-dialog");
  const error = dialog.querySelector(".dialog-error");
  error.textContent = reason;
  error.hidden = !reason;
  if (!dialog.open) dialog.showModal();
}

api.onUnauthorized = (error) => {
  sessionStorage.removeItem(TOKEN_KEY);
  askToken(error.message);
};

$("token-dialog").addEventListener("cancel", (event) => event.preventDefault());
$("token-dialog").querySelector("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const dialog = $("token-dialog");
  api.token = new FormData(event.target).get("token");
  try {
    await api.json("GET", "/channels", { query: { limit: 1 } });
  } catch (error) {
    const line = dialog.querySelector(".dialog-error");
    line.textContent = error.message;
    line.hidden = false;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, api.token);
  dialog.close();
  start();
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  api.token = "";
  askToken();
});

// -- refresh ------------------------------------------------------------------------

async function refreshTotals() {
  const stats = await api.json("GET", "/stats");
  const retention = [
    stats.max_events !== null && `at most ${number(stats.max_events)} events`,
    stats.max_age_seconds !== null && `at most ${number(stats.max_age_seconds)} s old`,
  ].filter(Boolean);
  $("totals").textContent =
    `${number(stats.channels)} channels · ${number(stats.events)} events · ` +
    `${number(stats.trimmed)} trimmed · retention: ${retention.join(", ") || "none"}`;
}

async function refreshChannel() {
  const name = state.channel;
  const stats = await api.json("GET", channelPath(name));
  if (name !== state.channel) return;
  const pairs = [
    ["epoch", String(stats.epoch)],
    ["head", number(stats.last_offset)],
    ["first offset", number(stats.first_offset)],
    ["count", number(stats.count)],
    ["oldest", time(stats.first_timestamp, { ms: true })],
    ["newest", time(stats.last_timestamp, { ms: true })],
    ["trimmed", number(stats.trimmed)],
  ];
  $("channel-stats").replaceChildren(
    ...pairs.map(([term, value]) => el("div", { dataset: { stat: term } }, el("dt", {}, term), el("dd", {}, value))),
  );
  $("delete-dialog").querySelector(".count").textContent = number(stats.count);
}

const tracked = (key, job) => job.then(() => resolveError(key), report(key));

async function refresh() {
  const jobs = [tracked("channels", channels.refresh()), tracked("stats", refreshTotals())];
  if (state.channel) {
    jobs.push(tracked("channel", refreshChannel()));
    jobs.push(tracked("consumers", showConsumers(api, state.channel, () => state.channel)));
  }
  await Promise.all(jobs);
}

function schedule() {
  clearTimeout(state.timer);
  if (!state.connected || !$("auto-refresh").checked) return;
  state.timer = setTimeout(async () => {
    if (!document.hidden) await refresh();
    schedule();
  }, REFRESH_MS);
}

$("refresh").addEventListener("click", () => refresh());
$("auto-refresh").addEventListener("change", schedule);
let typing = null;
$("prefix").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => channels.refresh().catch(report("channels")), 300);
});

// -- channel view -------------------------------------------------------------------

function openChannel(name) {
  if (name !== state.channel) {
    // Nothing of the previous channel may stay on screen under this one's name (its
    // events, with their copy buttons; its count in the Delete dialog) while this
    // one's answers are awaited, or when they fail.
    tail.stop();
    tail.clear();
    $("consumers").replaceChildren();
    $("channel-stats").replaceChildren();
    $("events").tBodies[0].replaceChildren();
    $("page-info").textContent = "";
    $("delete-dialog").querySelector(".count").textContent = "—";
  }
  state.channel = name;
  channels.selected = name;
  for (const row of $("channels").tBodies[0].rows) row.classList.toggle("selected", row.dataset.channel === name);
  $("channel-name").textContent = shownName(name);
  for (const node of document.querySelectorAll("dialog .channel")) node.textContent = shownName(name);
  $("channel-section").hidden = false;
  refreshChannel().catch(report("channel"));
  browser.open(name).catch(report("events"));
  showConsumers(api, name, () => state.channel).catch(report("consumers"));
}

function closeChannel() {
  tail.stop();
  state.channel = channels.selected = null;
  for (const row of $("channels").tBodies[0].rows) row.classList.remove("selected");
  $("channel-section").hidden = true;
}

function route() {
  const match = location.hash.match(/^#\/channel\/(.+)$/);
  if (!match) return closeChannel();
  try {
    openChannel(decodeURIComponent(match[1]));
  } catch (error) {
    showError("route", new Error(`bad channel address ${location.hash}: ${error.message}`));
  }
}
window.addEventListener("hashchange", () => state.connected && route());

for (const button of document.querySelectorAll("[data-page]")) {
  button.addEventListener("click", () => browser.load(button.dataset.page).catch(report("events")));
}
$("filter").addEventListener("submit", (event) => {
  event.preventDefault();
  browser.applyFilter().catch(report("events"));
});
// After the form has cleared its fields: "reset" fires before it does.
$("filter").addEventListener("reset", () => setTimeout(() => browser.applyFilter().catch(report("events"))));

$("tail-toggle").addEventListener("click", () => {
  if (tail.running) tail.stop();
  else tail.start(state.channel, Number($("tail-history").value) || 0);
});
$("tail-clear").addEventListener("click", () => tail.clear());

$("trim").addEventListener("click", () => {
  const name = state.channel;
  confirmDialog($("trim-dialog"), async (form) => {
    const body = {};
    if (form.get("before")) body.before = Number(form.get("before"));
    if (form.get("before_time")) body.before_time = isoTime(form.get("before_time"));
    const result = await api.json("POST", channelPath(name, "/trim"), { body });
    await Promise.all([refresh(), browser.load("newest").catch(report("events"))]);
    notice(`Trimmed ${shownName(name)}: ${number(result.removed)} events removed; its oldest offset is now ${number(result.first_offset)}.`);
  });
});

$("delete").addEventListener("click", () => {
  const name = state.channel;
  confirmDialog($("delete-dialog"), async () => {
    await api.json("DELETE", channelPath(name));
    channels.previous.delete(name);
    location.hash = "";
    closeChannel();
    notice(`Deleted ${shownName(name)}.`);
    await refresh();
  });
});

// -- start --------------------------------------------------------------------------

function start() {
  state.connected = true;
  route();
  refresh().then(schedule);
}

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved === null) {
  askToken();
} else {
  api.token = saved;
  start();
}
