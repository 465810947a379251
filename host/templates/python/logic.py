"""The logic of {{name}}, without host calls, so that it is unit-tested with plain Python."""


def summarize(order: dict, subject: str) -> dict:
    """The summary published for `order`. An order without an `id` raises KeyError: the host
    counts it as a failed attempt and the exception's text is the failure reason."""
    return {"id": order["id"], "subject": subject, "handled_by": "{{name}}"}
