"""Write Mailroom message handlers in Python (componentize-py 0.25).

A handler is a function from a `Message` to `None`, exported with `export`:

    import mailroom

    def handle(msg: mailroom.Message) -> None:
        order = msg.json()                       # bad JSON rejects the message
        output = mailroom.config.require("output-subject")
        mailroom.publish_json(output, order)     # a passing failure retries it

    WitWorld = mailroom.export(handle)

What the handler does to the JetStream message, as with the Rust SDK:

- returns: the host confirms every publish of the call, then acks the message;
- raises `mailroom.Retry(reason, delay_ms=None)`: redelivered later (after `delay_ms`, or the
  handler's backoff), dead-lettered after the last attempt;
- raises `mailroom.Reject(reason)`: never retried, dead-lettered with the reason;
- raises anything else: a failed attempt, like `Retry`; the exception's last traceback lines
  are the failure reason in the host's log and the dead-letter record.

Build with `componentize-py -d <mailroom>/sdk/wit -w handler componentize app -p . -p
<mailroom>/sdk/python -o handler.wasm`, where `app.py` is the module holding `WitWorld`.
"""

import json as _json
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

from componentize_py_types import Err
from wit_world.imports import config as _config
from wit_world.imports import kv as _kv
from wit_world.imports import log as _log
from wit_world.imports import publish as _publish
from wit_world.imports import types as _types

__all__ = [
    "Message", "Retry", "Reject", "export", "publish", "publish_json", "json_bytes",
    "kv", "log", "config",
]


class Retry(Exception):
    """A transient failure: try the message again later (after `delay_ms` when given)."""

    def __init__(self, reason: str, delay_ms: Optional[int] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_ms = delay_ms


class Reject(Exception):
    """A permanent failure: never retry; dead-letter the message with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Message:
    """One JetStream message, as the host delivers it."""

    def __init__(self, inner: _types.Message) -> None:
        self._inner = inner

    @property
    def subject(self) -> str:
        """The subject the producer published to."""
        return self._inner.subject

    @property
    def payload(self) -> bytes:
        """The payload bytes, unchanged."""
        return self._inner.payload

    @property
    def stream(self) -> str:
        """The stream that stored the message."""
        return self._inner.stream

    @property
    def sequence(self) -> int:
        """The message's sequence in its stream: unique, never reused."""
        return self._inner.sequence

    @property
    def attempt(self) -> int:
        """Which attempt this is, starting at 1."""
        return self._inner.attempt

    @property
    def handler_name(self) -> str:
        """The handler's name in the host configuration."""
        return self._inner.handler

    @property
    def published_unix_nanos(self) -> int:
        """When the stream stored the message, in nanoseconds since the Unix epoch."""
        return self._inner.published_unix_nanos

    def is_redelivery(self) -> bool:
        """Whether an earlier attempt at this message failed or was cut short."""
        return self._inner.attempt > 1

    def text(self) -> str:
        """The payload as UTF-8 text; a payload that is not UTF-8 rejects the message."""
        try:
            return self._inner.payload.decode("utf-8")
        except UnicodeDecodeError as err:
            raise Reject(f"payload of {self.subject} is not UTF-8 text: {err}") from None

    def json(self) -> Any:
        """The payload parsed as JSON; a payload that does not parse rejects the message."""
        try:
            return _json.loads(self._inner.payload)
        except ValueError as err:
            raise Reject(f"payload of {self.subject} is not the expected JSON: {err}") from None

    def header(self, name: str) -> Optional[str]:
        """The first value of header `name` (names compare case-insensitively)."""
        for value in self.header_values(name):
            return value
        return None

    def header_values(self, name: str) -> Iterator[str]:
        """Every value of header `name`, in order."""
        lower = name.lower()
        for header in self._inner.headers:
            if header.name.lower() == lower:
                yield from header.values

    def headers(self) -> List[Tuple[str, str]]:
        """Every header as `(name, value)` pairs, one pair per value."""
        return [(h.name, v) for h in self._inner.headers for v in h.values]


def export(handle: Callable[[Message], None]) -> type:
    """Makes the class componentize-py exports: `WitWorld = mailroom.export(handle)`."""

    class WitWorld:
        def handle(self, msg: _types.Message) -> None:
            try:
                handle(Message(msg))
            except Retry as err:
                raise Err(_types.HandlerError_Retry(_types.RetryInfo(err.reason, err.delay_ms)))
            except Reject as err:
                raise Err(_types.HandlerError_Reject(err.reason))

    return WitWorld


def json_bytes(value: Any) -> bytes:
    """Compact JSON with sorted keys, as UTF-8: byte for byte what `serde_json` writes for the
    same maps (the Rust SDK's `serde_json::Map`)."""
    return _json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def _publish_error(err: Any) -> Exception:
    value = err.value
    if isinstance(value, _publish.PublishError_Unavailable):
        return Retry(f"NATS unavailable: {value.value}")
    if isinstance(value, _publish.PublishError_Denied):
        return Reject(f"publish to {value.value} denied: not in this handler's publish.allow")
    if isinstance(value, _publish.PublishError_TooLarge):
        return Reject(f"message too large: the server accepts at most {value.value} bytes")
    if isinstance(value, _publish.PublishError_LimitReached):
        return Reject(f"publish limit reached: at most {value.value} publishes per message")
    return Reject(f"invalid subject {value.value!r}")


def publish(subject: str, payload: Union[bytes, str],
            headers: Optional[List[Tuple[str, str]]] = None) -> None:
    """Publishes `payload` to `subject`. The host acks the input only once it is confirmed.
    Unavailable raises `Retry`; denied, too large, over the limit or a bad subject `Reject`."""
    if isinstance(payload, str):
        payload = payload.encode()
    grouped: List[_types.Header] = []
    for name, value in headers or []:
        for header in grouped:
            if header.name == name:
                header.values.append(value)
                break
        else:
            grouped.append(_types.Header(name, [value]))
    try:
        _publish.publish(subject, payload, grouped)
    except Err as err:
        raise _publish_error(err) from None


def publish_json(subject: str, value: Any) -> None:
    """Publishes `value` as JSON (see `json_bytes`) with `Content-Type: application/json`."""
    publish(subject, json_bytes(value), [("Content-Type", "application/json")])


class _Kv:
    """Key-value storage in JetStream KV buckets (granted with `kv.allow`)."""

    class Entry:
        """A key's value and the revision that wrote it."""

        def __init__(self, value: bytes, revision: int) -> None:
            self.value = value
            self.revision = revision

    class Conflict(Exception):
        """A conditional write lost: the key changed since it was read (or exists)."""

    @staticmethod
    def _error(err: Any) -> Exception:
        value = err.value
        if isinstance(value, _kv.KvError_Conflict):
            return _Kv.Conflict(f"conflicting write to {value.value}")
        if isinstance(value, (_kv.KvError_Unavailable, _kv.KvError_NoSuchBucket)):
            return Retry(f"KV unavailable: {value.value}")
        if isinstance(value, _kv.KvError_Denied):
            return Reject(f"KV bucket {value.value} denied: not in this handler's kv.allow")
        if isinstance(value, _kv.KvError_InvalidKey):
            return Reject(f"invalid KV key {value.value!r}")
        return Reject(f"KV value too large: the server accepts at most {value.value} bytes")

    def get(self, bucket: str, key: str) -> Optional["_Kv.Entry"]:
        """The key's value and revision, or None when absent or deleted."""
        try:
            found = _kv.get(bucket, key)
        except Err as err:
            raise self._error(err) from None
        return None if found is None else _Kv.Entry(found.value, found.revision)

    def put(self, bucket: str, key: str, value: Union[bytes, str]) -> int:
        """Stores `value` and returns the new revision once durably stored."""
        try:
            return _kv.put(bucket, key, _bytes(value))
        except Err as err:
            raise self._error(err) from None

    def put_if(self, bucket: str, key: str, value: Union[bytes, str], revision: int) -> int:
        """Stores `value` only if the key's revision is still `revision`; raises `Conflict`."""
        try:
            return _kv.put_if(bucket, key, _bytes(value), revision)
        except Err as err:
            raise self._error(err) from None

    def create(self, bucket: str, key: str, value: Union[bytes, str]) -> int:
        """Stores `value` only if the key does not exist; raises `Conflict`."""
        try:
            return _kv.create(bucket, key, _bytes(value))
        except Err as err:
            raise self._error(err) from None

    def delete(self, bucket: str, key: str) -> None:
        """Deletes the key; deleting a missing key succeeds."""
        try:
            _kv.delete(bucket, key)
        except Err as err:
            raise self._error(err) from None

    def apply_once(self, bucket: str, key: str,
                   update: Callable[[Optional[bytes]], Union[bytes, str]]) -> int:
        """Applies this message's effect to one key exactly once: reads the value, writes
        `update(value)` conditionally, and reads again on a conflict. A re-run of the same
        message (a retry, a redelivery after a crash) is recognised by the host and stores
        nothing. Returns the revision holding the effect."""
        for _ in range(_APPLY_ATTEMPTS):
            entry = self.get(bucket, key)
            try:
                if entry is None:
                    return self.create(bucket, key, update(None))
                return self.put_if(bucket, key, update(entry.value), entry.revision)
            except _Kv.Conflict:
                continue
        raise Retry(f"{bucket}/{key} kept changing: {_APPLY_ATTEMPTS} conflicting writes in a row")


_APPLY_ATTEMPTS = 16


def _bytes(value: Union[bytes, str]) -> bytes:
    return value.encode() if isinstance(value, str) else value


class _Log:
    """Logging through the host, with structured fields: `log.info("done", order_id=7)`."""

    @staticmethod
    def _write(level: _log.Level, message: str, fields: dict) -> None:
        _log.log(level, message, [_log.Field(k, str(v)) for k, v in fields.items()])

    def trace(self, message: str, **fields: Any) -> None:
        self._write(_log.Level.TRACE, message, fields)

    def debug(self, message: str, **fields: Any) -> None:
        self._write(_log.Level.DEBUG, message, fields)

    def info(self, message: str, **fields: Any) -> None:
        self._write(_log.Level.INFO, message, fields)

    def warn(self, message: str, **fields: Any) -> None:
        self._write(_log.Level.WARN, message, fields)

    def error(self, message: str, **fields: Any) -> None:
        self._write(_log.Level.ERROR, message, fields)


class _Config:
    """The handler's `[handler.config]` settings."""

    @staticmethod
    def get(key: str) -> Optional[str]:
        return _config.get(key)

    @staticmethod
    def require(key: str) -> str:
        """The setting; a missing one rejects the message with a reason naming the key."""
        value = _config.get(key)
        if value is None:
            raise Reject(f"setting {key!r} is missing: add it under [handler.config] in the "
                         "host configuration")
        return value


kv = _Kv()
log = _Log()
config = _Config()
