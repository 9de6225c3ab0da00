// The admin HTTP API as the console uses it: every call carries the bearer token and
// every failure becomes an ApiError that says which request failed, with the status
// and the server's `detail`.

export class ApiError extends Error {
  constructor(method, path, status, detail) {
    super(`${method} ${path} → ${status || "network error"}: ${detail}`);
    this.name = "ApiError";
    this.status = status; // 0 when the server could not be reached
    this.detail = detail;
  }
}

// `detail` is a string for our own errors and a list for FastAPI's validation errors.
async function readDetail(response) {
  const text = await response.text().catch(() => "");
  let detail;
  try {
    detail = JSON.parse(text).detail;
  } catch {
    return text.slice(0, 300) || response.statusText;
  }
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc ?? []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

export function channelPath(channel, suffix = "") {
  // %2F keeps a "/" inside a name apart from the route's own slashes.
  return `/channels/${encodeURIComponent(channel)}${suffix}`;
}

export class Api {
  constructor(base) {
    this.base = base; // the admin app's root: the console lives at <base>ui/
    this.token = "";
    this.onUnauthorized = () => {};
  }

  async request(method, path, { query = {}, body, headers = {}, signal } = {}) {
    const url = new URL(path.slice(1), this.base);
    for (const [name, value] of Object.entries(query)) {
      if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
    }
    const init = { method, signal, headers: { ...headers }, cache: "no-store" };
    if (this.token) init.headers.Authorization = `Bearer ${this.token}`;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(method, path, 0, error.message);
    }
    if (!response.ok) {
      const error = new ApiError(method, path, response.status, await readDetail(response));
      if (response.status === 401) this.onUnauthorized(error);
      throw error;
    }
    return response;
  }

  async json(method, path, options) {
    const response = await this.request(method, path, options);
    return response.status === 204 ? null : response.json();
  }
}
