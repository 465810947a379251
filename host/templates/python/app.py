"""{{name}}: a Mailroom message handler. It reads a JSON order and publishes a summary to the
subject in its `output-subject` setting."""

import mailroom
from logic import summarize


def handle(msg: mailroom.Message) -> None:
    order = msg.json()  # a payload that is not JSON rejects the message
    output = mailroom.config.require("output-subject")
    summary = summarize(order, msg.subject)
    mailroom.log.info("order received", order_id=summary["id"])
    mailroom.publish_json(output, summary)


WitWorld = mailroom.export(handle)
