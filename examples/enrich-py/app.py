"""enrich, in Python: parses a JSON order, adds fields, publishes it to the `output-subject`
setting. Byte for byte the same outputs as the Rust `enrich` (a test checks it)."""

import mailroom


def tier(cents: int) -> str:
    if cents <= 9_999:
        return "small"
    if cents <= 99_999:
        return "medium"
    return "large"


def handle(msg: mailroom.Message) -> None:
    order = msg.json()
    if not isinstance(order, dict):
        raise mailroom.Reject(f"payload of {msg.subject} is not the expected JSON: not an object")
    output = mailroom.config.require("output-subject")

    cents = order.get("amount_cents")
    # Like serde_json's as_u64: an integer from 0 to 2^64 - 1, not a float or a boolean.
    if isinstance(cents, int) and not isinstance(cents, bool) and 0 <= cents < 2**64:
        order["amount"] = f"{cents // 100}.{cents % 100:02}"
        order["tier"] = tier(cents)
    order["source"] = {
        "subject": msg.subject,
        "stream": msg.stream,
        "sequence": msg.sequence,
        "attempt": msg.attempt,
    }
    order["enriched_by"] = msg.handler_name

    mailroom.log.debug("enriched", subject=msg.subject, sequence=msg.sequence)
    mailroom.publish_json(output, order)


WitWorld = mailroom.export(handle)
