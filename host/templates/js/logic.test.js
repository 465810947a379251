import { test } from "node:test";
import assert from "node:assert/strict";

import { summarize } from "./logic.js";

test("summarizes an order", () => {
  assert.deepEqual(summarize({ id: 7, amount: 1 }, "orders.eu"), {
    id: 7,
    subject: "orders.eu",
    handled_by: "{{name}}",
  });
});

test("an order without an id throws", () => {
  assert.throws(() => summarize({}, "orders.eu"), /no id/);
});
