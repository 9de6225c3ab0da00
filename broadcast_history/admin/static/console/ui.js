// Small DOM helpers shared by the console's parts. Everything the server sends is put
// in the page as text (textContent), never parsed as markup.

export const $ = (id) => document.getElementById(id);

// el("td", {className: "num"}, "text", child...): an element with properties and children.
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else node[name] = value;
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

export const number = (n) => (n === null || n === undefined ? "—" : n.toLocaleString("en-US"));

// "2024-05-01T12:00:00.123456Z" -> "2024-05-01 12:00:00.123" (the API's times are UTC).
export function time(iso, { ms = false } = {}) {
  if (!iso) return el("span", { className: "muted" }, "—");
  const date = new Date(iso);
  const text = Number.isNaN(date.getTime()) ? iso : date.toISOString().slice(0, ms ? 23 : 19).replace("T", " ");
  return el("time", { dateTime: iso, title: iso }, text);
}

// What an operator types in a time field, as the API wants it: a time without a zone
// is UTC, as everywhere on this page. A zone is Z, +hh, +hhmm or +hh:mm after the time.
export function isoTime(text) {
  const value = text.trim();
  if (!value) return undefined;
  if (/^\d{4}-\d{2}-\d{2}$/.test(value)) return `${value}T00:00:00Z`;
  return /(Z|[T ].*[+-]\d{2}(:?\d{2})?)$/i.test(value) ? value : `${value}Z`;
}

// Characters that do not show, or show as something else: controls, zero-width ones,
// the marks that turn text right to left, spaces other than the plain one.
const UNSEEN =
  /[\u0000-\u001f\u007f-\u00a0\u00ad\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\ufeff]/gu;

// A channel name as the page shows it. Names that differ only in spaces at their ends,
// runs of spaces or characters that do not show looked the same (in a Delete dialog
// too): such a name is shown in quotes, those characters as \u{…}.
export function shownName(name) {
  UNSEEN.lastIndex = 0;
  if (!/^\s|\s$|\s\s/u.test(name) && !UNSEEN.test(name)) return name;
  const escaped = name.replace(UNSEEN, (c) => `\\u{${c.codePointAt(0).toString(16).padStart(4, "0")}}`);
  return `"${escaped}"`;
}

const MAX_SHOWN = 500;

// The message cell of an event: an encoding badge, then the text (or base64), shortened
// when long; a click shows all of it.
export function message(event) {
  const badge = el("span", { className: `badge ${event.encoding}` }, event.encoding);
  const long = event.message.length > MAX_SHOWN;
  // Cut and counted by characters, not UTF-16 units: an emoji is never cut in two.
  const chars = long ? Array.from(event.message) : null;
  const short = long ? `${chars.slice(0, MAX_SHOWN).join("")}… (${number(chars.length)} chars)` : event.message;
  const text = el("span", { className: "content" }, short);
  if (long) {
    text.classList.add("long");
    text.title = "click to show all";
    text.addEventListener("click", () => {
      const full = text.textContent === short;
      text.textContent = full ? event.message : short;
    });
  }
  return el("span", { className: "message" }, badge, text);
}

export function copyButton(value, onError) {
  const button = el("button", { type: "button", className: "copy", title: `copy ${value}` }, "copy id");
  button.dataset.copy = value;
  button.addEventListener("click", async () => {
    try {
      await copyText(value);
      button.textContent = "copied";
    } catch (error) {
      onError(new Error(`could not copy ${value} to the clipboard: ${error.message}`));
      return;
    }
    setTimeout(() => (button.textContent = "copy id"), 1500);
  });
  return button;
}

async function copyText(value) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(value);
  // Plain http to another host is not a secure context: no Clipboard API there.
  const area = el("textarea", { value, readOnly: true, className: "offscreen" });
  document.body.append(area);
  area.select();
  const done = document.execCommand("copy");
  area.remove();
  if (!done) throw new Error("the browser refused");
}

const stamp = () => new Date().toISOString().slice(11, 19);
const errorLine = (key) => [...$("errors").children].find((node) => node.dataset.key === key);

// Errors stay on screen until dismissed; a repeated one (same key, e.g. an
// auto-refresh that keeps failing) updates its line instead of adding lines.
export function showError(key, error) {
  const box = $("errors");
  let line = errorLine(key);
  if (line?.classList.contains("resolved")) {
    line.classList.remove("resolved");
    line.dataset.count = "0";
  }
  if (!line) {
    const close = el("button", { type: "button", className: "dismiss", title: "dismiss" }, "×");
    line = el("div", { className: "error", dataset: { key, count: "0" } }, el("span"), close);
    close.addEventListener("click", () => line.remove());
    box.append(line);
  }
  const count = Number(line.dataset.count) + 1;
  line.dataset.count = String(count);
  line.firstChild.textContent = `${stamp()}  ${error.message}${count > 1 ? `  (×${count})` : ""}`;
}

// The same request worked again: the error stays on screen, marked as over.
export function resolveError(key) {
  const line = errorLine(key);
  if (!line || line.classList.contains("resolved")) return;
  line.classList.add("resolved");
  line.firstChild.textContent += `  — working again since ${stamp()}`;
}

export function notice(text) {
  const box = $("notice");
  box.textContent = text;
  box.hidden = !text;
}

// Open a modal <dialog> whose form confirms an action. The dialog stays open, with
// the error shown in it, if the action fails.
export function confirmDialog(dialog, action) {
  const form = dialog.querySelector("form");
  const error = dialog.querySelector(".dialog-error");
  error.hidden = true;
  form.reset(); // no bounds left over from the last time
  form.onsubmit = async (event) => {
    event.preventDefault();
    const buttons = form.querySelectorAll("button");
    buttons.forEach((button) => (button.disabled = true));
    try {
      await action(new FormData(form));
      dialog.close();
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
    } finally {
      buttons.forEach((button) => (button.disabled = false));
    }
  };
  const cancel = form.querySelector(".cancel");
  if (cancel) cancel.onclick = () => dialog.close();
  dialog.showModal();
}
