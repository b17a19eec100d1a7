"""Logging setup: journald priorities, terminal and plain formats, live level, rate limits."""

from __future__ import annotations

import collections
import datetime
import logging
import os
import sys
import time
import unicodedata
import weakref
from collections.abc import Hashable, Mapping
from typing import IO, Final

import attrs

logger = logging.getLogger(__name__)

HANDLER_NAME: Final = "smap-notify"
LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
COLOURS: Final[Mapping[int, str]] = {
    logging.DEBUG: "\x1b[2m",
    logging.INFO: "\x1b[32m",
    logging.WARNING: "\x1b[33m",
    logging.ERROR: "\x1b[31m",
    logging.CRITICAL: "\x1b[1;31m",
}
RESET: Final = "\x1b[0m"


def parse_level(name: str) -> int:
    """The logging level for a ``LOGGER_LEVEL`` value: debug, info, warn, error."""
    try:
        return LEVELS[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {name!r}: expected debug, info, warn or error"
        ) from None


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald files a record of ``levelno`` under."""
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


MAX_MESSAGE: Final = 4096  # characters of one log message (tracebacks not counted)
# C0 and C1 controls and the Unicode line and paragraph separators: each can end a line
# for some reader of the log (a terminal, a shipper that splits like str.splitlines).
_CONTROLS: Final = {
    i: f"\\x{i:02x}" if i < 256 else f"\\u{i:04x}"
    for i in (*range(32), *range(127, 160), 0x2028, 0x2029)
} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


class _Escapes(dict[int, str]):
    """``str.translate``'s table: the controls above, and every format character
    (Unicode category Cf: U+202E and U+2066 reorder the text a terminal or a log viewer
    shows, U+200B hides in it) and lone surrogate (Cs: not UTF-8, so not writable).
    Looked up only for text that is not printable, so the category costs nothing on
    the usual line; nothing else is cached, so the table stays as small as it starts."""

    def __missing__(self, code: int) -> str:
        if unicodedata.category(chr(code)) not in ("Cf", "Cs"):
            raise LookupError(code)  # translate keeps the character
        return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


_ESCAPES: Final = _Escapes(_CONTROLS)


def one_line(text: str) -> str:
    """``text`` as one bounded line: a newline inside a published job_id or channel name
    must not start a forged log line, nor a 300 KB value make a 300 KB one."""
    if not text.isprintable():
        text = text.translate(_ESCAPES)
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE} more characters)"
    return text


class _Formatter(logging.Formatter):
    """Every message on one line (tracebacks keep theirs)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class JournalFormatter(_Formatter):
    """``<6>logger: message``; journald adds the time.

    journald takes the priority from each line's prefix, so every line of a multi-line
    record (a traceback) carries it, and ``journalctl -p err`` shows the whole traceback.
    """

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.split("\n"))


class PlainFormatter(_Formatter):
    """``2025-12-07T17:00:00.123+00:00 INFO logger: message``, in UTC, for files and pipes."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        return stamp.isoformat(timespec="milliseconds")


class TerminalFormatter(_Formatter):
    """Local time, level and logger for a person at a terminal, in colour when asked."""

    def __init__(self, *, colour: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.colour = colour

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created)
        return stamp.strftime("%H:%M:%S.") + f"{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname:<7}"
        if self.colour:
            level = COLOURS.get(record.levelno, "") + level + RESET
        return f"{record.asctime} {level} {record.name}: {one_line(record.message)}"


def is_journal_stream(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journald stream named by ``$JOURNAL_STREAM`` (dev:inode)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev_text, sep, ino_text = value.partition(":")
    if not sep:
        return False
    try:
        dev, ino = int(dev_text), int(ino_text)
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        # OSError includes io.UnsupportedOperation: a stream without a file descriptor.
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def wants_colour(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal, and not when ``NO_COLOR`` is set (no-color.org)."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


def choose_formatter(stream: IO[str], environ: Mapping[str, str]) -> logging.Formatter:
    """The journald, terminal or plain formatter, whichever suits ``stream``."""
    if is_journal_stream(stream, environ):
        return JournalFormatter()
    try:
        tty = stream.isatty()
    except ValueError:
        tty = False
    if tty:
        return TerminalFormatter(colour=wants_colour(stream, environ))
    return PlainFormatter()


def configure_logging(
    level: str,
    *,
    stream: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Give the root logger one handler on ``stream`` (stderr) at ``level``.

    Raises ValueError for an unknown level. Calling it again replaces the handler it
    installed before and leaves other handlers alone.
    """
    levelno = parse_level(level)
    out = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(out)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(choose_formatter(out, env))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)


def set_level(level: str) -> None:
    """Change the root level live (a reload); raises ValueError for an unknown level."""
    logging.getLogger().setLevel(parse_level(level))


@attrs.define
class _Bucket:
    tokens: float
    updated: float
    suppressed: int = 0


@attrs.define
class RateLimiter:
    """A token bucket per key: ``burst`` events at once, refilled over ``per_seconds``.

    ``check`` returns whether to log, and how many events of that key were suppressed
    since it last allowed one, for a ``suppressed=N`` field. At most ``max_keys`` keys are
    kept; the least recently seen goes first, with its pending count. Pure: the caller
    passes the time (``time.monotonic()``). Not thread-safe: one per task or thread.
    """

    per_seconds: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    burst: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    max_keys: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    _buckets: collections.OrderedDict[Hashable, _Bucket] = attrs.field(
        init=False, factory=collections.OrderedDict
    )

    def check(self, key: Hashable, now: float) -> tuple[bool, int]:
        """``(allowed, suppressed)`` for one event of ``key`` at time ``now``."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), updated=now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            refill = elapsed * self.burst / self.per_seconds
            bucket.tokens = min(float(self.burst), bucket.tokens + refill)
            bucket.updated = max(bucket.updated, now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            suppressed, bucket.suppressed = bucket.suppressed, 0
            return True, suppressed
        bucket.suppressed += 1
        return False, 0

    def drain_suppressed(self) -> list[tuple[Hashable, int]]:
        """Keys with events suppressed since their last allowed one, with the counts; resets.

        For a final ``suppressed=N`` line when a flood stops and ``check`` is not called again.
        """
        pending = [(k, b.suppressed) for k, b in self._buckets.items() if b.suppressed]
        for key, _ in pending:
            self._buckets[key].suppressed = 0
        return pending

    def __len__(self) -> int:
        return len(self._buckets)


_limited_loggers: weakref.WeakSet[LimitedLogger] = weakref.WeakSet()


class LimitedLogger:
    """A logger whose events are rate-limited per key, each line ending ``suppressed=N``
    when earlier events of that key were held back; ``report_suppressed`` tells of the
    held-back events of a flood that stopped."""

    def __init__(
        self, logger: logging.Logger, *, per_seconds: float = 10.0, burst: int = 5
    ) -> None:
        self.logger = logger
        self.limiter = RateLimiter(per_seconds=per_seconds, burst=burst)
        self._levels: dict[Hashable, int] = {}
        _limited_loggers.add(self)

    def report_suppressed(self) -> None:
        """One line per key whose events were held back since its last line."""
        for key, count in self.limiter.drain_suppressed():
            level = self._levels.pop(key, logging.INFO)
            self.logger.log(
                level, "events held back by the rate limit key=%s suppressed=%d", key, count
            )

    def log(
        self, level: int, key: Hashable, msg: str, *args: object, exc_info: bool = False
    ) -> None:
        if not self.logger.isEnabledFor(level):
            return
        allowed, suppressed = self.limiter.check(key, time.monotonic())
        if not allowed:
            self._levels[key] = level  # for report_suppressed
            return
        if suppressed:
            msg += " suppressed=%d"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args, exc_info=exc_info)


def report_suppressed() -> None:
    """Every rate-limited logger's held-back events (called every ``per_seconds`` and at
    exit), so that a flood that stopped is not under-reported."""
    for limited in list(_limited_loggers):
        limited.report_suppressed()
