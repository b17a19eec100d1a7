"""Log formats for journald, terminals and files; live level; rate limiting."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from smap_notify.logs import (
    HANDLER_NAME,
    JournalFormatter,
    LimitedLogger,
    PlainFormatter,
    RateLimiter,
    TerminalFormatter,
    choose_formatter,
    configure_logging,
    is_journal_stream,
    parse_level,
    report_suppressed,
    set_level,
    syslog_priority,
)

PLAIN_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 (?P<level>[A-Z]+) (?P<name>\S+): (?P<msg>.*)$"
)


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def journal_env(stream: IO[str]) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def our_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("debug", logging.DEBUG),
        ("INFO", logging.INFO),
        ("Warn", logging.WARNING),
        ("warning", logging.WARNING),
        (" error\n", logging.ERROR),
    ],
)
def test_parse_level_accepts_logger_level_names(name: str, level: int) -> None:
    assert parse_level(name) == level


@pytest.mark.parametrize("name", ["", "trace", "fatal", "critical", "10"])
def test_parse_level_rejects_other_names(name: str) -> None:
    with pytest.raises(ValueError, match="debug, info, warn or error"):
        parse_level(name)


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.CRITICAL, 3),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (5, 7),
    ],
)
def test_syslog_priority_of_each_level(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority


def test_journal_prefix_on_every_line_of_a_traceback(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w+") as stream:
        configure_logging("info", stream=stream, environ=journal_env(stream))
        log = logging.getLogger("smap_notify.hub")
        log.info("user connected user=%s conn=%d", "u1", 7)
        try:
            raise RuntimeError("redis went away\nsecond line")
        except RuntimeError:
            log.exception("subscriber failed state=%s", "retrying")
        log.debug("not shown")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines[0] == "<6>smap_notify.hub: user connected user=u1 conn=7"
    assert lines[1] == "<3>smap_notify.hub: subscriber failed state=retrying"
    assert len(lines) > 4
    assert all(line.startswith("<3>") for line in lines[1:])
    assert "<3>Traceback (most recent call last):" in lines
    assert "<3>second line" in lines
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines)


def test_journal_formatter_prefixes_stack_info() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "look", None, None)
    record.stack_info = "Stack (most recent call last):\n  File a\n  File b"
    lines = JournalFormatter().format(record).split("\n")
    assert lines[0] == "<4>x: look"
    assert all(line.startswith("<4>") for line in lines)
    assert len(lines) == 4


def test_journal_stream_must_match_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        assert is_journal_stream(a, journal_env(a))
        assert not is_journal_stream(b, journal_env(a))
        assert not is_journal_stream(a, {"JOURNAL_STREAM": "garbage"})
        assert not is_journal_stream(a, {})
    assert not is_journal_stream(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_file_gets_plain_utc_lines_without_colour(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w+") as stream:
        configure_logging("debug", stream=stream, environ={"JOURNAL_STREAM": "1:1"})
        logging.getLogger("smap_notify.redis").warning("redis lost error=%s", "timeout")
        logging.getLogger("smap_notify.redis").debug("retry in=%.1f", 0.5)
        stream.seek(0)
        lines = stream.read().splitlines()
    assert len(lines) == 2
    first = PLAIN_LINE.match(lines[0])
    assert first is not None
    assert first.group("level", "name", "msg") == (
        "WARNING",
        "smap_notify.redis",
        "redis lost error=timeout",
    )
    second = PLAIN_LINE.match(lines[1])
    assert second is not None and second.group("level") == "DEBUG"
    assert not any("\x1b" in line for line in lines)


def test_pipe_gets_plain_lines() -> None:
    read_fd, write_fd = os.pipe()
    with open(read_fd) as reader, open(write_fd, "w") as writer:
        assert isinstance(choose_formatter(writer, {}), PlainFormatter)
        configure_logging("info", stream=writer, environ={})
        logging.getLogger("p").info("through a pipe")
        writer.flush()
        line = reader.readline().rstrip("\n")
    match = PLAIN_LINE.match(line)
    assert match is not None and match.group("msg") == "through a pipe"


@pytest.fixture
def terminal() -> Iterator[tuple[IO[str], int]]:
    """A text stream on a pseudo-terminal, and the master fd to read what was written."""
    master, slave = pty.openpty()
    with open(slave, "w") as stream:
        yield stream, master
    os.close(master)


def test_terminal_gets_colour_unless_no_color(terminal: tuple[IO[str], int]) -> None:
    stream, master = terminal
    configure_logging("info", stream=stream, environ={})
    logging.getLogger("smap_notify.hub").error("boom")
    stream.flush()
    coloured = os.read(master, 4096).decode()
    assert "\x1b[31m" in coloured and "boom" in coloured
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3}", coloured)

    configure_logging("info", stream=stream, environ={"NO_COLOR": "1"})
    logging.getLogger("smap_notify.hub").error("boom again")
    stream.flush()
    plain = os.read(master, 4096).decode()
    assert "boom again" in plain and "\x1b" not in plain
    assert "ERROR" in plain


def test_terminal_formatter_without_colour_has_time_level_and_name() -> None:
    record = logging.LogRecord("a.b", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    text = TerminalFormatter(colour=False).format(record)
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} INFO    a\.b: hello x", text)


def test_configure_twice_keeps_one_handler_and_others_alone() -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    configure_logging("info", stream=io.StringIO(), environ={})
    configure_logging("error", stream=io.StringIO(), environ={})
    assert len(our_handlers()) == 1
    assert foreign in root.handlers
    assert root.level == logging.ERROR


def test_configure_rejects_unknown_level_before_touching_handlers() -> None:
    with pytest.raises(ValueError):
        configure_logging("verbose", stream=io.StringIO(), environ={})
    assert our_handlers() == []


def test_set_level_changes_level_live() -> None:
    stream = io.StringIO()
    configure_logging("warn", stream=stream, environ={})
    log = logging.getLogger("smap_notify.reload")
    log.info("hidden")
    set_level("DEBUG")
    log.debug("shown")
    assert "hidden" not in stream.getvalue()
    assert "shown" in stream.getvalue()
    with pytest.raises(ValueError):
        set_level("loud")
    assert logging.getLogger().level == logging.DEBUG


def test_rate_limiter_allows_burst_then_reports_suppressed_count() -> None:
    limiter = RateLimiter(per_seconds=10.0, burst=3)
    results = [limiter.check("bad-json", 100.0) for _ in range(7)]
    assert results == [(True, 0)] * 3 + [(False, 0)] * 4
    # One token comes back every per_seconds / burst seconds.
    assert limiter.check("bad-json", 103.0) == (False, 0)
    assert limiter.check("bad-json", 103.4) == (True, 5)
    assert limiter.check("bad-json", 103.5) == (False, 0)


def test_limited_logger_keeps_the_traceback_of_the_lines_it_lets_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = LimitedLogger(logging.getLogger("smap_notify.test"), burst=2)
    for _ in range(5):
        try:
            raise TypeError("boom")
        except TypeError:
            log.log(logging.ERROR, "k", "failed n=%d", 1, exc_info=True)
    records = [r for r in caplog.records if r.name == "smap_notify.test"]
    assert len(records) == 2
    assert all(r.exc_info and r.exc_info[0] is TypeError for r in records)


@pytest.mark.parametrize(
    "formatter",
    [JournalFormatter(), PlainFormatter(), TerminalFormatter(colour=False)],
    ids=["journal", "plain", "terminal"],
)
def test_a_published_newline_cannot_start_a_forged_log_line(
    formatter: logging.Formatter,
) -> None:
    job_id = "J2\n2026-01-01T00:00:00.000+00:00 CRITICAL smap_notify: forged\r\x1b[31m\x85\u2028"
    record = logging.LogRecord("smap_notify.hub", logging.INFO, "", 0, "job_id=%s", (job_id,), None)
    text = formatter.format(record)
    assert "\n" not in text
    assert text.endswith(
        "job_id=J2\\n2026-01-01T00:00:00.000+00:00 CRITICAL smap_notify: forged\\r\\x1b[31m"
        "\\x85\\u2028"
    )


@pytest.mark.parametrize(
    "formatter",
    [JournalFormatter(), PlainFormatter(), TerminalFormatter(colour=False)],
    ids=["journal", "plain", "terminal"],
)
def test_bidi_and_other_format_characters_are_escaped(formatter: logging.Formatter) -> None:
    """A user id with U+202E (right-to-left override) made a terminal or log viewer show
    the rest of the line reversed; U+2066, U+200B, U+FEFF and the tag characters are
    format characters (Cf) too, and a lone surrogate cannot be written as UTF-8."""
    user = "admin\u202egnp.exe\u2066x\u200b\ufeff\U000e0041\ud800é中"
    record = logging.LogRecord("smap_notify.hub", logging.INFO, "", 0, "user=%s", (user,), None)
    text = formatter.format(record)
    assert text.endswith("user=admin\\u202egnp.exe\\u2066x\\u200b\\ufeff\\U000e0041\\ud800é中")
    text.encode("utf-8")  # writable


def test_a_huge_value_makes_a_bounded_line_and_tracebacks_keep_their_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "smap_notify.hub", logging.ERROR, "", 0, "job_id=%s", ("x" * 300_000,), sys.exc_info()
        )
    first, *rest = PlainFormatter().format(record).split("\n")
    assert len(first) < 4300
    assert first.endswith("... (295911 more characters)")  # 300,007 - 4,096
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom"


def test_held_back_events_are_reported_when_the_flood_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = LimitedLogger(logging.getLogger("smap_notify.test.flood"), burst=2)
    for n in range(5):
        log.log(logging.WARNING, "rejected:invalid_json", "message rejected n=%d", n)
    report_suppressed()
    report_suppressed()  # nothing new held back: nothing more to say
    lines = [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == "smap_notify.test.flood"
    ]
    assert lines == [
        (logging.WARNING, "message rejected n=0"),
        (logging.WARNING, "message rejected n=1"),
        (
            logging.WARNING,
            "events held back by the rate limit key=rejected:invalid_json suppressed=3",
        ),
    ]


def test_rate_limiter_refills_to_burst_only() -> None:
    limiter = RateLimiter(per_seconds=1.0, burst=2)
    assert limiter.check("k", 0.0) == (True, 0)
    results = [limiter.check("k", 1000.0) for _ in range(3)]
    assert results == [(True, 0), (True, 0), (False, 0)]


def test_rate_limiter_keys_are_independent() -> None:
    limiter = RateLimiter(per_seconds=60.0, burst=1)
    assert limiter.check("a", 0.0) == (True, 0)
    assert limiter.check("a", 0.0) == (False, 0)
    assert limiter.check(("b", 1), 0.0) == (True, 0)


def test_rate_limiter_ignores_time_going_backwards() -> None:
    limiter = RateLimiter(per_seconds=10.0, burst=1)
    assert limiter.check("k", 50.0) == (True, 0)
    assert limiter.check("k", 10.0) == (False, 0)
    assert limiter.check("k", 59.0) == (False, 0)
    assert limiter.check("k", 60.0) == (True, 2)


def test_rate_limiter_memory_is_bounded_least_recent_first() -> None:
    limiter = RateLimiter(per_seconds=60.0, burst=1, max_keys=3)
    for key in ["a", "b", "c"]:
        limiter.check(key, 0.0)
    limiter.check("a", 1.0)  # a is now the most recent
    limiter.check("d", 2.0)
    assert len(limiter) == 3
    assert limiter.check("a", 3.0) == (False, 0)  # still limited: kept
    assert limiter.check("b", 3.0) == (True, 0)  # forgotten: starts afresh
    for n in range(10_000):
        limiter.check(n, 4.0)
    assert len(limiter) == 3


def test_rate_limiter_drain_reports_pending_counts_once() -> None:
    limiter = RateLimiter(per_seconds=60.0, burst=1)
    for _ in range(4):
        limiter.check("flood", 0.0)
    limiter.check("quiet", 0.0)
    assert limiter.drain_suppressed() == [("flood", 3)]
    assert limiter.drain_suppressed() == []
    assert limiter.check("flood", 60.0) == (True, 0)


@pytest.mark.parametrize(
    "kwargs", [{"per_seconds": 0.0}, {"burst": 0}, {"max_keys": 0}, {"per_seconds": -1.0}]
)
def test_rate_limiter_rejects_nonsense_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateLimiter(**kwargs)  # type: ignore[arg-type]
