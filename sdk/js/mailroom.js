// Write Mailroom message handlers in JavaScript.
//
// Built and tested with jco 1.35's QuickJS backend:
//
//   jco componentize app.js --wit <mailroom>/sdk/wit -n handler \
//       --backend quickjs --backend-qjs-disable-async -o handler.wasm
//
// componentize-js 0.23 (StarlingMonkey) built with `--disable http fetch-event` runs it too
// (checked by hand with enrich-js): the imports, numbers and errors of both are normalised here.
//
//   import { handler, publishJson, config, log, Reject } from "./mailroom.js";
//
//   export const handle = handler((msg) => {
//     const order = msg.json();                     // bad JSON rejects the message
//     const output = config.require("output-subject");
//     publishJson(output, order);                   // a passing failure retries it
//   });
//
// What the handler does to the JetStream message, as with the Rust SDK: returning confirms
// every publish and acks; throwing `new Retry(reason, delayMs)` redelivers it later (dead-
// lettered after the last attempt); throwing `new Reject(reason)` dead-letters it at once;
// throwing anything else is a failed attempt, like Retry, with the error's text as the reason.

import * as kvImport from "mailroom:handler/kv@0.2.0";
import * as publishImport from "mailroom:handler/publish@0.2.0";
import * as logImport from "mailroom:handler/log@0.2.0";
import * as configImport from "mailroom:handler/config@0.2.0";

// QuickJS exposes each interface as a default export, StarlingMonkey as named exports.
const kvHost = kvImport.default ?? kvImport;
const publishHost = publishImport.default ?? publishImport;
const logHost = logImport.default ?? logImport;
const configHost = configImport.default ?? configImport;

/** A transient failure: try the message again later (after `delayMs` when given). */
export class Retry extends Error {
  constructor(reason, delayMs) {
    super(reason);
    this.reason = reason;
    this.delayMs = delayMs;
  }
}

/** A permanent failure: never retry; dead-letter the message with `reason`. */
export class Reject extends Error {
  constructor(reason) {
    super(reason);
    this.reason = reason;
  }
}

/** A conditional KV write lost: the key changed since it was read (or exists). */
export class Conflict extends Error {}

// ---- UTF-8 (QuickJS has no TextEncoder) -------------------------------------------------

/** The UTF-8 bytes of `text`. */
export function utf8(text) {
  const out = [];
  for (const ch of String(text)) {
    let c = ch.codePointAt(0);
    if (c >= 0xd800 && c <= 0xdfff) c = 0xfffd; // a lone surrogate
    if (c < 0x80) out.push(c);
    else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 63));
    else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    else
      out.push(
        0xf0 | (c >> 18),
        0x80 | ((c >> 12) & 63),
        0x80 | ((c >> 6) & 63),
        0x80 | (c & 63),
      );
  }
  return new Uint8Array(out);
}

/** `bytes` decoded as UTF-8; throws `Reject` when they are not UTF-8. */
export function fromUtf8(bytes, what = "bytes") {
  let text = "";
  for (let i = 0; i < bytes.length; ) {
    const b = bytes[i];
    const need = b < 0x80 ? 0 : b < 0xc2 ? -1 : b < 0xe0 ? 1 : b < 0xf0 ? 2 : b < 0xf5 ? 3 : -1;
    if (need < 0 || i + need >= bytes.length) {
      throw new Reject(`${what} is not UTF-8 text (byte ${i})`);
    }
    let c = need === 0 ? b : b & (0x3f >> need);
    for (let k = 1; k <= need; k++) {
      const next = bytes[i + k];
      if ((next & 0xc0) !== 0x80) {
        throw new Reject(`${what} is not UTF-8 text (byte ${i + k})`);
      }
      c = (c << 6) | (next & 63);
    }
    const min = [0, 0x80, 0x800, 0x10000][need];
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) {
      throw new Reject(`${what} is not UTF-8 text (byte ${i})`);
    }
    text += String.fromCodePoint(c);
    i += need + 1;
  }
  return text;
}

// ---- JSON ----------------------------------------------------------------------------------

function sortedJson(value) {
  if (value === null || typeof value !== "object") {
    if (typeof value === "bigint") return value.toString();
    if (typeof value === "number" && !Number.isFinite(value)) return "null";
    return JSON.stringify(value) ?? "null";
  }
  if (Array.isArray(value)) return `[${value.map(sortedJson).join(",")}]`;
  const keys = Object.keys(value).filter((k) => value[k] !== undefined);
  keys.sort((a, b) => (utf8Less(a, b) ? -1 : utf8Less(b, a) ? 1 : 0));
  return `{${keys.map((k) => `${JSON.stringify(k)}:${sortedJson(value[k])}`).join(",")}}`;
}

// Keys sort by their UTF-8 bytes, as Rust's `String` ordering (serde_json's map) does; JS
// compares UTF-16 units, which differs above U+FFFF.
function utf8Less(a, b) {
  const x = utf8(a);
  const y = utf8(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    if (x[i] !== y[i]) return x[i] < y[i];
  }
  return x.length < y.length;
}

/** Compact JSON with keys sorted, as UTF-8: what `serde_json` writes for the same maps. */
export function jsonBytes(value) {
  return utf8(sortedJson(value));
}

// ---- the message -----------------------------------------------------------------------------

/** One JetStream message, as the host delivers it. */
export class Message {
  constructor(inner) {
    this.subject = inner.subject;
    /** The payload bytes, unchanged (a Uint8Array). */
    this.payload = inner.payload;
    this.headers = inner.headers;
    this.stream = inner.stream;
    /** The stream sequence, as a number (exact up to 2^53). */
    this.sequence = Number(inner.sequence);
    this.attempt = Number(inner.attempt);
    this.publishedUnixNanos = inner.publishedUnixNanos;
    this.handlerName = inner.handler;
  }

  /** Whether an earlier attempt at this message failed or was cut short. */
  isRedelivery() {
    return this.attempt > 1;
  }

  /** The payload as UTF-8 text; a payload that is not UTF-8 rejects the message. */
  text() {
    return fromUtf8(this.payload, `payload of ${this.subject}`);
  }

  /** The payload parsed as JSON; a payload that does not parse rejects the message. */
  json() {
    const text = this.text();
    try {
      return JSON.parse(text);
    } catch (err) {
      throw new Reject(`payload of ${this.subject} is not the expected JSON: ${err.message}`);
    }
  }

  /** The first value of header `name` (names compare case-insensitively), or undefined. */
  header(name) {
    const lower = name.toLowerCase();
    for (const h of this.headers) {
      if (h.name.toLowerCase() === lower && h.values.length > 0) return h.values[0];
    }
    return undefined;
  }
}

/** Wraps `fn(msg)` as the component's `handle` export: `export const handle = handler(fn)`. */
export function handler(fn) {
  return function handle(inner) {
    try {
      fn(new Message(inner));
    } catch (err) {
      if (err instanceof Retry) {
        const delayMs = err.delayMs === undefined ? undefined : Math.max(0, Math.floor(err.delayMs));
        throw { tag: "retry", val: { reason: err.reason, delayMs } };
      }
      if (err instanceof Reject) throw { tag: "reject", val: err.reason };
      throw err;
    }
  };
}

// ---- host calls ------------------------------------------------------------------------------

// A refused import call throws its WIT error, under `payload` in both runtimes.
function witError(err) {
  return err && err.payload !== undefined ? err.payload : err;
}

function publishError(e) {
  switch (e.tag) {
    case "unavailable":
      return new Retry(`NATS unavailable: ${e.val}`);
    case "denied":
      return new Reject(`publish to ${e.val} denied: not in this handler's publish.allow`);
    case "too-large":
      return new Reject(`message too large: the server accepts at most ${e.val} bytes`);
    case "limit-reached":
      return new Reject(`publish limit reached: at most ${e.val} publishes per message`);
    default:
      return new Reject(`invalid subject ${JSON.stringify(e.val)}`);
  }
}

function bytes(value) {
  return typeof value === "string" ? utf8(value) : value;
}

/**
 * Publishes `payload` (a string or Uint8Array) to `subject`, with optional headers as
 * `[name, value]` pairs. Unavailable throws Retry; denied, too large, over the limit or a bad
 * subject throw Reject.
 */
export function publish(subject, payload, headers = []) {
  const grouped = [];
  for (const [name, value] of headers) {
    const found = grouped.find((h) => h.name === name);
    if (found) found.values.push(value);
    else grouped.push({ name, values: [value] });
  }
  try {
    publishHost.publish(subject, bytes(payload), grouped);
  } catch (err) {
    throw publishError(witError(err));
  }
}

/** Publishes `value` as JSON (see `jsonBytes`) with `Content-Type: application/json`. */
export function publishJson(subject, value) {
  publish(subject, jsonBytes(value), [["Content-Type", "application/json"]]);
}

function kvError(e) {
  switch (e.tag) {
    case "conflict":
      return new Conflict(`conflicting write to ${e.val}`);
    case "unavailable":
    case "no-such-bucket":
      return new Retry(`KV unavailable: ${e.val}`);
    case "denied":
      return new Reject(`KV bucket ${e.val} denied: not in this handler's kv.allow`);
    case "invalid-key":
      return new Reject(`invalid KV key ${JSON.stringify(e.val)}`);
    default:
      return new Reject(`KV value too large: the server accepts at most ${e.val} bytes`);
  }
}

function kvCall(f) {
  try {
    return f();
  } catch (err) {
    throw kvError(witError(err));
  }
}

const APPLY_ATTEMPTS = 16;

/** Key-value storage in JetStream KV buckets (granted with `kv.allow`). */
export const kv = {
  /** `{ value: Uint8Array, revision: number }`, or null when absent or deleted. */
  get(bucket, key) {
    const found = kvCall(() => kvHost.get(bucket, key));
    return found == null ? null : { value: found.value, revision: Number(found.revision) };
  },
  /** Stores `value`; returns the new revision once durably stored. */
  put(bucket, key, value) {
    return Number(kvCall(() => kvHost.put(bucket, key, bytes(value))));
  },
  /** Stores `value` only if the key's revision is still `revision`; throws Conflict. */
  putIf(bucket, key, value, revision) {
    return Number(kvCall(() => kvHost.putIf(bucket, key, bytes(value), toU64(revision))));
  },
  /** Stores `value` only if the key does not exist; throws Conflict. */
  create(bucket, key, value) {
    return Number(kvCall(() => kvHost.create(bucket, key, bytes(value))));
  },
  /** Deletes the key; deleting a missing key succeeds. */
  delete(bucket, key) {
    kvCall(() => kvHost.delete(bucket, key));
  },
  /**
   * Applies this message's effect to one key exactly once: reads the value (a Uint8Array, or
   * null), writes `update(value)` conditionally, and reads again on a conflict. A re-run of
   * the same message is recognised by the host and stores nothing.
   */
  applyOnce(bucket, key, update) {
    for (let i = 0; i < APPLY_ATTEMPTS; i++) {
      const entry = kv.get(bucket, key);
      try {
        return entry === null
          ? kv.create(bucket, key, update(null))
          : kv.putIf(bucket, key, update(entry.value), entry.revision);
      } catch (err) {
        if (!(err instanceof Conflict)) throw err;
      }
    }
    throw new Retry(`${bucket}/${key} kept changing: ${APPLY_ATTEMPTS} conflicting writes in a row`);
  },
};

// StarlingMonkey passes u64 as BigInt, QuickJS as a number.
const U64_AS_BIGINT = typeof kvImport.default === "undefined";
function toU64(n) {
  return U64_AS_BIGINT ? BigInt(n) : n;
}

function write(level, message, fields) {
  const list = Object.entries(fields ?? {}).map(([name, value]) => ({ name, value: String(value) }));
  logHost.log(level, String(message), list);
}

/** Logging through the host, with structured fields: `log.info("done", { orderId: 7 })`. */
export const log = {
  trace: (message, fields) => write("trace", message, fields),
  debug: (message, fields) => write("debug", message, fields),
  info: (message, fields) => write("info", message, fields),
  warn: (message, fields) => write("warn", message, fields),
  error: (message, fields) => write("error", message, fields),
};

/** The handler's `[handler.config]` settings. */
export const config = {
  get(key) {
    return configHost.get(key) ?? undefined;
  },
  /** The setting; a missing one rejects the message with a reason naming the key. */
  require(key) {
    const value = configHost.get(key);
    if (value == null) {
      throw new Reject(
        `setting "${key}" is missing: add it under [handler.config] in the host configuration`,
      );
    }
    return value;
  },
};
