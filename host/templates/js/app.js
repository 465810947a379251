// {{name}}: a Mailroom message handler. It reads a JSON order and publishes a summary to the
// subject in its `output-subject` setting.

import { handler, config, log, publishJson } from "./mailroom.js";
import { summarize } from "./logic.js";

export const handle = handler((msg) => {
  const order = msg.json(); // a payload that is not JSON rejects the message
  const output = config.require("output-subject");
  const summary = summarize(order, msg.subject);
  log.info("order received", { order_id: summary.id });
  publishJson(output, summary);
});
