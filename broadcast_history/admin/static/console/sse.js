// Server-Sent Events read from a fetch() response body. EventSource cannot send an
// Authorization header, so the console reads the stream itself; this follows the
// parsing rules of the HTML standard's "event stream interpretation".

// Yields {type, data, id} for each event, {comment} for each comment line (the server
// sends `: ping` when the stream is idle), {retry} for retry fields (the stream opens
// with one).
export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "";
  let data = [];
  let lastId = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // A chunk may end between the "\r" and "\n" of one line end: keep a final "\r".
      const end = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, end).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(end);
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield { type: type || "message", data: data.join("\n"), id: lastId };
          type = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) {
          yield { comment: line.slice(1).trim() };
          continue;
        }
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "data") data.push(text);
        else if (field === "event") type = text;
        else if (field === "id" && !text.includes("\0")) lastId = text;
        else if (field === "retry" && /^\d+$/.test(text)) yield { retry: Number(text) };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
