"""Channel templates (CHANNELS): parsing, validation, and routing a channel to its audience.

Pure: no I/O. A template is fixed text with at most two fields: ``{user}`` (the user id)
and one topic field (``{project}``, ``{job}``...). Without ``{user}`` it is a broadcast.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final, NamedTuple

import attrs

DEFAULT_CHANNELS: Final = "user_noti:{user}"
USER_FIELD: Final = "user"
RAW_SUFFIX: Final = "|raw"
FILTER_SUFFIX: Final = "Id"  # a filter's query parameter: the field's name, then "Id"
MAX_TEMPLATES: Final = 32
ID_PATTERN: Final = r"[A-Za-z0-9_-]{1,50}"
# The topic era's rule for ids taken from topic templates and for filter values.
VALID_ID: Final = re.compile(ID_PATTERN)
_ID_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_FIELD_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
# Redis glob syntax: in a template it would change what the subscription pattern matches.
_GLOB_CHARS: Final = frozenset("*?[]\\")
_PART: Final = re.compile(r"\{([^{}]*)\}")


class ChannelsError(ValueError):
    """CHANNELS has problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@attrs.frozen
class Template:
    """One channel template, as written (``spec``) and taken apart."""

    spec: str  # as written, with |raw if given
    text: str  # without |raw: the metric label
    raw: bool  # forward the published object unchanged instead of the envelope
    pieces: tuple[str, ...]  # fixed text and field names alternating: text, field, text...
    regex: re.Pattern[str] | None = attrs.field(eq=False, repr=False)

    @property
    def fields(self) -> tuple[str, ...]:
        return self.pieces[1::2]

    @property
    def prefix(self) -> str:
        return self.pieces[0]

    @property
    def has_user(self) -> bool:
        return USER_FIELD in self.fields

    @property
    def topic(self) -> str | None:
        """The topic field's name, if the template has one."""
        return next((f for f in self.fields if f != USER_FIELD), None)

    @property
    def pattern(self) -> str:
        """What the daemon subscribes to: the fixed prefix and ``*``, or the exact channel."""
        return self.prefix + "*" if self.fields else self.text

    def build(self, values: Mapping[str, str]) -> str:
        """The channel for these field values (the inverse of ``Channels.match``)."""
        return "".join(values[p] if i % 2 else p for i, p in enumerate(self.pieces))


# Where a channel goes: (template, user or None for everyone, topic field or None, the
# topic's value). A plain tuple: one is made per message, and building a named tuple or
# an attrs instance cost 5 to 40 times as much as the tuple itself.
Match = tuple[Template, str | None, str | None, str]


# How a template is matched: its fixed prefix; the fixed text after {user} when the user
# is the only field, or None for an exact channel; the regex of a topic template.
_Route = tuple[str, "str | None", "re.Pattern[str] | None", Template]


def _route(template: Template) -> _Route:
    if not template.fields:
        return template.text, None, None, template
    suffix = "" if template.regex is not None else template.pieces[2]
    return template.prefix, suffix, template.regex, template


@attrs.frozen
class Channels:
    """The parsed CHANNELS setting: templates in the order a channel is matched."""

    templates: tuple[Template, ...]
    # Derived from templates, once: matching runs for every message.
    _routes: tuple[_Route, ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_routes", tuple(_route(t) for t in self.templates))

    def __str__(self) -> str:
        return ",".join(t.spec for t in self.templates)

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(t.pattern for t in self.templates)

    @property
    def filter_fields(self) -> tuple[str, ...]:
        """Topic fields a connection may filter on, each once, in template order."""
        return tuple(dict.fromkeys(t.topic for t in self.templates if t.topic))

    def match(self, channel: str) -> Match | str:
        """The template ``channel`` belongs to, or the rejection reason (``bad_channel``,
        ``empty_user_id``). No two templates' patterns overlap, so at most one fits."""
        for prefix, suffix, regex, template in self._routes:
            if not channel.startswith(prefix):
                continue
            if regex is not None:
                m = regex.fullmatch(channel)
                if m is None:
                    continue
                groups = m.groupdict()
                topic = template.topic
                return template, groups.get(USER_FIELD), topic, groups[topic] if topic else ""
            if suffix is None:  # an exact broadcast channel
                if channel == prefix:
                    return template, None, None, ""
                continue
            # {user} alone: the user id is all the text between the fixed parts, any text.
            if suffix and not channel.endswith(suffix):
                continue
            user = channel[len(prefix) : len(channel) - len(suffix)]
            if not user:
                return "empty_user_id"
            return template, user, None, ""
        return "bad_channel"


def parse_channels(text: str) -> Channels:
    """Parse CHANNELS; raises ChannelsError listing every problem."""
    problems: list[str] = []
    templates: list[Template] = []
    specs = [s.strip() for s in text.split(",")]
    if len(specs) > MAX_TEMPLATES:
        raise ChannelsError([f"{len(specs)} templates, at most {MAX_TEMPLATES}"])
    for number, spec in enumerate(specs, 1):
        if not spec:
            problems.append(f"template {number} is empty (two commas in a row, or one at an end)")
            continue
        try:
            template = parse_template(spec)
        except ValueError as exc:
            problems.append(f"template {spec!r}: {exc}")
            continue
        for other in templates:
            if overlap := _overlap(other, template):
                problems.append(f"templates {other.spec!r} and {spec!r} {overlap}")
        templates.append(template)
    if problems:
        raise ChannelsError(problems)
    return Channels(tuple(templates))


def parse_template(spec: str) -> Template:
    """Parse one template; raises ValueError with the first problem."""
    text, raw = spec, False
    if "|" in spec:
        text, _, suffix = spec.partition("|")
        if suffix != RAW_SUFFIX[1:]:
            raise ValueError(f"unknown option |{suffix} (the only one is {RAW_SUFFIX})")
        raw = True
    if bad := sorted({c for c in text if c in _GLOB_CHARS or c.isspace()}):
        raise ValueError(
            f"characters {' '.join(repr(c) for c in bad)} are not allowed"
            " (* ? [ ] \\ are Redis pattern syntax; no white space)"
        )
    pieces = _PART.split(text)
    fields = pieces[1::2]
    for piece in pieces[::2]:
        if "{" in piece or "}" in piece:
            raise ValueError("a '{' or '}' that does not enclose a field name")
    for name in fields:
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(
                f"field {{{name}}}: a field name is a letter, then letters, digits or _"
                " (at most 40)"
            )
    if len(set(fields)) < len(fields):
        raise ValueError("a field is used twice")
    if len([f for f in fields if f != USER_FIELD]) > 1:
        raise ValueError(
            f"at most one field besides {{{USER_FIELD}}} (the topic), got"
            f" {', '.join('{' + f + '}' for f in fields)}"
        )
    if not pieces[0]:
        raise ValueError("no fixed prefix: a template starts with fixed text, e.g. 'job:'")
    between = pieces[2:-1:2]
    if any(not piece for piece in between):
        raise ValueError("two fields with no fixed text between them")
    topic = any(f != USER_FIELD for f in fields)
    if topic and any(set(piece) <= _ID_CHARS for piece in between):
        # Ids are [A-Za-z0-9_-]: a separator made of those alone would be ambiguous.
        raise ValueError(
            "the text between two fields must hold a character ids cannot have, e.g. ':'"
        )
    regex = None
    if topic:
        regex = re.compile(
            "".join(
                f"(?P<{p}>{ID_PATTERN})" if i % 2 else re.escape(p) for i, p in enumerate(pieces)
            )
        )
    return Template(spec, text, raw, tuple(pieces), regex)


def _overlap(a: Template, b: Template) -> str:
    """Why a channel could match both (Redis would then deliver it twice), or ""."""
    if a.text == b.text:
        return "are the same"
    ends = [(t.prefix if t.fields else t.text, bool(t.fields)) for t in (a, b)]
    (pa, wild_a), (pb, wild_b) = ends
    if (wild_a and pb.startswith(pa)) or (wild_b and pa.startswith(pb)):
        return f"overlap: their patterns {a.pattern} and {b.pattern} match the same channels"
    return ""


DEFAULT: Final = parse_channels(DEFAULT_CHANNELS)


def parse_filters(
    params: Mapping[str, list[str]], fields: Iterable[str]
) -> tuple[dict[str, str] | None, str | None]:
    """The connection's filters (field -> value; None when it has none) from the query's
    parameters, or the name of the first parameter whose value is invalid. An empty value
    is no filter; parameters for fields no template has are not looked at."""
    filters: dict[str, str] = {}
    for field in fields:
        values = params.get(field + FILTER_SUFFIX)
        if not values or not values[0]:
            continue
        if not VALID_ID.fullmatch(values[0]):
            return None, field + FILTER_SUFFIX
        filters[field] = values[0]
    return filters or None, None


def wants(filters: Mapping[str, str] | None, topic: str | None, value: str) -> bool:
    """The delivery rule: a connection gets a topic's message unless it filters that
    field on another value."""
    return filters is None or topic is None or filters.get(topic, value) == value


class Subscription(NamedTuple):
    """One Redis subscription: a channel (SUBSCRIBE) or a glob pattern (PSUBSCRIBE).
    A named tuple: the plan hashes these a dozen times per new user, in C this way."""

    name: str
    pattern: bool


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in _GLOB_CHARS else c for c in text)


def connection_subscriptions(
    channels: Channels, user: str, filters: Mapping[str, str] | None
) -> tuple[Subscription, ...]:
    """What one connection of ``user`` with ``filters`` needs subscribed, per user
    (broadcast templates excluded: see ``shared_subscriptions``)."""
    return user_subscriptions(channels, user, (filters,))


def user_subscriptions(
    channels: Channels, user: str, filter_sets: Iterable[Mapping[str, str] | None]
) -> tuple[Subscription, ...]:
    """What all of ``user``'s connections (one filter set each) need subscribed together,
    in template order: per topic template the per-user pattern when one of them has no
    filter on the topic, else the exact channel of each value asked. Never both: Redis
    would deliver a message on that channel twice."""
    sets = list(filter_sets)
    out: list[Subscription] = []
    for template in channels.templates:
        if not template.has_user:
            continue
        topic = template.topic
        if topic is None:
            out.append(Subscription(template.build({USER_FIELD: user}), False))
            continue
        if not VALID_ID.fullmatch(user):
            continue  # such a user id never routes from a topic template
        values = dict.fromkeys((filters or {}).get(topic) for filters in sets)
        if None in values:
            escaped = {USER_FIELD: _glob_escape(user), topic: "*"}
            out.append(Subscription(template.build(escaped), True))
            continue
        for value in values:
            assert value is not None
            out.append(Subscription(template.build({USER_FIELD: user, topic: value}), False))
    return tuple(out)


def shared_subscriptions(channels: Channels) -> tuple[Subscription, ...]:
    """The broadcast templates' subscriptions: one for the whole daemon."""
    return tuple(
        Subscription(t.pattern, bool(t.fields)) for t in channels.templates if not t.has_user
    )
