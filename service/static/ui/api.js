// Calls to the service's /v1 API, with the API key and the service's error messages.
//
// The page is served at <service>/ui/, so the API is at ../v1/ (this also holds behind a
// proxy that serves the app under a prefix). The key, when the service needs one, is asked
// for once and kept in sessionStorage (for this browser tab's session only).

const KEY_STORAGE = "depass-api-key";

/** A failed call: the service's own message, its HTTP status and the field at fault. */
export class ServiceError extends Error {
  constructor(message, status, param = null, code = null) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** GET or POST (with a JSON body) to /v1/<path>; resolves to the JSON answer. */
export async function call(path, body = undefined) {
  const headers = { Accept: "application/json" };
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method: body === undefined ? "GET" : "POST", headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(new URL(`../v1/${path}`, document.baseURI), init);
  } catch (err) {
    throw new ServiceError(`could not reach the service: ${err.message}`, 0);
  }
  const text = await response.text();
  let answer = null;
  try {
    answer = text ? JSON.parse(text) : null;
  } catch {
    answer = null;
  }
  if (!response.ok) {
    const error = answer && answer.error;
    if (error && typeof error.message === "string") {
      throw new ServiceError(error.message, response.status, error.param, error.code);
    }
    throw new ServiceError(`HTTP ${response.status}: ${text.slice(0, 200)}`, response.status);
  }
  return answer;
}

/** An encoded array of a response (the viewer asks for "list") as nested arrays. */
export function arrayOf(encoded) {
  if (!encoded) return null;
  if (encoded.encoding !== "list") {
    throw new ServiceError(`unexpected array encoding ${encoded.encoding}`, 0);
  }
  return encoded.data;
}
