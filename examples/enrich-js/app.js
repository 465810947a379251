// enrich, in JavaScript: parses a JSON order, adds fields, publishes it to the
// `output-subject` setting. Byte for byte the same outputs as the Rust `enrich` (a test checks
// it) for orders whose numbers JavaScript holds exactly (integers up to 2^53, floats that are
// not whole numbers).

import { handler, config, log, publishJson, Reject } from "../../sdk/js/mailroom.js";

function tier(cents) {
  if (cents <= 9_999) return "small";
  if (cents <= 99_999) return "medium";
  return "large";
}

export const handle = handler((msg) => {
  const order = msg.json();
  if (order === null || typeof order !== "object" || Array.isArray(order)) {
    throw new Reject(`payload of ${msg.subject} is not the expected JSON: not an object`);
  }
  const output = config.require("output-subject");

  const cents = order.amount_cents;
  // Like serde_json's as_u64: a non-negative integer.
  if (Number.isSafeInteger(cents) && cents >= 0) {
    order.amount = `${Math.floor(cents / 100)}.${String(cents % 100).padStart(2, "0")}`;
    order.tier = tier(cents);
  }
  order.source = {
    subject: msg.subject,
    stream: msg.stream,
    sequence: msg.sequence,
    attempt: msg.attempt,
  };
  order.enriched_by = msg.handlerName;

  log.debug("enriched", { subject: msg.subject, sequence: msg.sequence });
  publishJson(output, order);
});
