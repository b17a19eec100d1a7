"""Configuration: the original's environment names, parsed into one frozen attrs class."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import cattrs

from .channels import DEFAULT as DEFAULT_CHANNELS
from .channels import Channels, parse_channels

PRODUCTION_ORIGINS: Final = (
    "https://smap.tantai.dev",
    "https://smap-api.tantai.dev",
    "http://smap.tantai.dev",
    "http://smap-api.tantai.dev",
)
DEV_SUBNETS: Final = ("172.16.21.0/24", "172.16.19.0/24", "192.168.1.0/24")
LOG_LEVELS: Final = ("debug", "info", "warn", "warning", "error")
OVERFLOW_POLICIES: Final = ("drop", "disconnect")
SUBSCRIBE_MODES: Final = ("pattern", "user")
PUBSUB_KINDS: Final = ("classic", "sharded")
MIN_SECRET_BYTES: Final = 32  # RFC 7518 section 3.2: at least the hash size, 256 bits for HS256
SECRET_FIELDS: Final = frozenset(
    {"jwt_secret_key", "jwt_previous_secret_key", "redis_password", "redis_sentinel_password"}
)
# Settings that a SIGHUP reload cannot change on a running daemon.
RESTART_FIELDS: Final = frozenset(
    {
        "ws_host",
        "ws_port",
        "ws_reuse_port",
        "admin_host",
        "admin_port",
        "redis_host",
        "redis_password",
        "redis_db",
        "redis_use_tls",
        "redis_cluster",
        "redis_sentinels",
        "redis_sentinel_master",
        "redis_sentinel_password",
        "redis_subscribe",
        "redis_pubsub",
    }
)

_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", re.ASCII)
_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # MICRO SIGN, and below GREEK SMALL LETTER MU: Go takes both
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# Longer than any timeout means anything; 1e308 passed the finiteness check and then
# overflowed in the arithmetic of the drain (exit 70 at SIGTERM).
MAX_DURATION: Final = 1e9  # about 31 years


class Duration(float):
    """Seconds, parsed from a Go duration string (``30s``, ``1m30s``, ``500ms``)."""


def shown(text: str, limit: int = 40) -> str:
    """``repr`` of a value in an error message, cut: a value can be kilobytes long."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def parse_duration(text: str) -> Duration:
    """Parse a Go duration string (an optional ``+``, then number-unit pairs); a bare
    number means seconds."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    bad = f"not a duration: {shown(text)} (use e.g. 30s, 1m30s, 500ms)"
    if not s.replace("µ", "u").replace("μ", "u").isascii() or "_" in s:
        raise ValueError(bad)  # float() reads '1_0' and '٣'
    try:
        seconds = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(bad)
        if seconds > MAX_DURATION:
            raise ValueError(f"not a duration: {shown(text)} (over {MAX_DURATION:.0f}s)")
        return Duration(seconds)
    pos, total = 0, 0.0
    if s[0] == "-":  # Go reads it; no setting here takes one
        raise ValueError(f"not a duration: {shown(text)} (a duration here is positive)")
    if s[0] == "+":
        pos = 1
        if len(s) == 1:
            raise ValueError(bad)
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(bad)
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if total > MAX_DURATION:  # 400 nines and a unit: infinite
        raise ValueError(f"not a duration: {shown(text)} (over {MAX_DURATION:.0f}s)")
    return Duration(total)


def parse_bool(text: str) -> bool:
    s = text.strip().lower()
    if s in ("1", "true", "yes", "on", "t", "y"):
        return True
    if s in ("0", "false", "no", "off", "f", "n", ""):
        return False
    raise ValueError(f"not a boolean: {shown(text)} (use true or false)")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name.upper()} must be greater than 0, got {value}")


def _port(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name.upper()} must be a port number 0-65535, got {value}")


def _at_least(minimum: int) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
        if value < minimum:
            raise ValueError(f"{attribute.name.upper()} must be at least {minimum}, got {value}")

    return check


_WHOLE_NUMBER: Final = re.compile(r"[+-]?[0-9]+")


def _parse_int(value: object) -> int:
    text = str(value).strip()
    # Not int() alone: it also reads '10_000' and digits of other scripts ('٨٠٨١').
    if not _WHOLE_NUMBER.fullmatch(text):
        raise ValueError(f"not a whole number: {shown(text)}")
    return int(text)


def _lower(value: str) -> str:
    return value.lower()


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if value.lower() not in choices:
            raise ValueError(f"{attribute.name.upper()} must be one of {', '.join(choices)}")

    return check


_HOST_NAME: Final = re.compile(
    r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?"
)


def _listen_host(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(value):
        name = attribute.name.upper()
        raise ValueError(
            f"{name} must be an address or host name of this machine (0.0.0.0 for every IPv4"
            f" address, :: for every address; the port goes in {name[:-4]}PORT),"
            f" got {shown(value)}"
        )


def _host_port_problem(name: str, value: str) -> str | None:
    """Why ``value`` is not a host:port for setting ``name``; None when it is one."""
    if "@" in value:
        # user:password@host:port or a URL with credentials: the value is not repeated,
        # since this message goes to the log and to --check-config's output.
        return (
            f"{name} must be host:port (e.g. localhost:6379), got a value with user"
            " information (not shown); the password goes in"
            f" {'REDIS_SENTINEL_PASSWORD' if name == 'REDIS_SENTINELS' else 'REDIS_PASSWORD'}"
        )
    if "://" in value or "?" in value:  # a URL: its query may hold a password
        return (
            f"{name} must be host:port (e.g. localhost:6379), got a URL (not shown);"
            " TLS is REDIS_USE_TLS, the database REDIS_DB, the password REDIS_PASSWORD"
        )
    host, sep, port = value.rpartition(":")
    if (
        not sep
        or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)
        or not _redis_host_part(host)
    ):
        return f"{name} must be host:port (e.g. localhost:6379), got {shown(value)}"
    return None


def _redis_host(_inst: Any, _attribute: attrs.Attribute[Any], value: str) -> None:
    # A comma list names several nodes of one Redis Cluster (REDIS_CLUSTER=true, checked
    # with the other settings in load_config and __attrs_post_init__).
    for item in value.split(","):
        if problem := _host_port_problem("REDIS_HOST", item.strip()):
            raise ValueError(problem)


def _redis_sentinels(_inst: Any, _attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for item in value:
        if problem := _host_port_problem("REDIS_SENTINELS", item):
            raise ValueError(problem.replace(" must be ", ": each must be ", 1))


# Sentinel's own events (+switch-master <name> <ip> <port> ...) separate words with
# spaces: a name with a blank or a control character could not be told apart in them.
_SENTINEL_MASTER_NAME: Final = re.compile(r"[!-~]{1,200}", re.ASCII)


def _sentinel_master(_inst: Any, _attribute: attrs.Attribute[Any], value: str) -> None:
    if value and not _SENTINEL_MASTER_NAME.fullmatch(value):
        raise ValueError(
            "REDIS_SENTINEL_MASTER must be the name the sentinels monitor (sentinel monitor"
            f" <name> ...: printable ASCII, no blanks), got {shown(value)}"
        )


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` (a validated one) as host and port; brackets of IPv6 removed."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _redis_host_part(host: str) -> bool:
    """A host name, an IPv4 address, or an IPv6 address (in brackets, or without)."""
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return not bracketed and _HOST_NAME.fullmatch(host) is not None
    return address.version == 6 or not bracketed


def _subnets(_inst: Any, _attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"DEV_ORIGIN_SUBNETS: not a network: {shown(item)}") from None


def _secret(_inst: Any, _attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise ValueError("JWT_SECRET_KEY is required (the HMAC secret identity-srv signs with)")


@attrs.frozen
class Config:
    """Effective configuration; field ``x_y`` is read from environment name ``X_Y``."""

    jwt_secret_key: str = attrs.field(repr=False, validator=_secret)
    ws_host: str = attrs.field(default="0.0.0.0", validator=_listen_host)
    ws_port: int = attrs.field(default=8081, validator=_port)
    # SO_REUSEPORT: several daemons on one host share WS_HOST:WS_PORT, the kernel spreads
    # new connections over them.
    ws_reuse_port: bool = False
    # /health and /metrics of this process alone, on an address of its own; 0: none.
    admin_host: str = attrs.field(default="127.0.0.1", validator=_listen_host)
    admin_port: int = attrs.field(default=0, validator=_port)
    env: str = "production"
    redis_host: str = attrs.field(default="localhost:6379", validator=_redis_host)
    redis_password: str = attrs.field(default="", repr=False)
    redis_db: int = attrs.field(default=0, validator=_at_least(0))
    redis_use_tls: bool = False
    # A Redis Cluster: REDIS_HOST names one or several of its nodes, the subscriber moves
    # to another live node when its own fails.
    redis_cluster: bool = False
    # With sentinels, the master is the one they name; REDIS_HOST is not used.
    redis_sentinels: tuple[str, ...] = attrs.field(default=(), validator=_redis_sentinels)
    redis_sentinel_master: str = attrs.field(default="", validator=_sentinel_master)
    redis_sentinel_password: str = attrs.field(default="", repr=False)
    # pattern: one PSUBSCRIBE per CHANNELS template, every message published; user: the
    # channels this instance's connections need, subscribed as users come.
    redis_subscribe: str = attrs.field(
        default="pattern", converter=_lower, validator=_one_of(SUBSCRIBE_MODES)
    )
    # classic: (P)SUBSCRIBE on one node, for PUBLISH; sharded: SSUBSCRIBE each user's
    # channel on the master owning its slot, for SPUBLISH (a cluster in user mode only).
    redis_pubsub: str = attrs.field(
        default="classic", converter=_lower, validator=_one_of(PUBSUB_KINDS)
    )
    # user mode: how long a channel stays subscribed after its user's last connection.
    redis_unsubscribe_grace: Duration = attrs.field(default=Duration(5), validator=_positive)
    ws_ping_interval: Duration = attrs.field(default=Duration(30), validator=_positive)
    ws_pong_wait: Duration = attrs.field(default=Duration(60), validator=_positive)
    ws_write_wait: Duration = attrs.field(default=Duration(10), validator=_positive)
    ws_max_message_size: int = attrs.field(default=512, validator=_positive)
    ws_max_connections: int = attrs.field(default=10000, validator=_positive)
    ws_max_connections_per_user: int = attrs.field(default=100, validator=_positive)
    ws_send_buffer: int = attrs.field(default=256, validator=_positive)
    ws_send_buffer_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)
    ws_overflow_policy: str = attrs.field(
        default="drop", converter=_lower, validator=_one_of(OVERFLOW_POLICIES)
    )
    ws_handshake_timeout: Duration = attrs.field(default=Duration(10), validator=_positive)
    http_max_header_size: int = attrs.field(default=32768, validator=_at_least(1024))
    jwt_previous_secret_key: str = attrs.field(default="", repr=False)
    cookie_name: str = "smap_auth_token"
    logger_level: str = attrs.field(default="info", converter=_lower, validator=_one_of(LOG_LEVELS))
    allowed_origins: tuple[str, ...] = PRODUCTION_ORIGINS
    dev_origin_subnets: tuple[str, ...] = attrs.field(default=DEV_SUBNETS, validator=_subnets)
    shutdown_timeout: Duration = attrs.field(default=Duration(10), validator=_positive)
    resync_on_reconnect: bool = True
    resync_on_drop: bool = True
    deliver_invalid_payloads: bool = False
    channels: Channels = DEFAULT_CHANNELS

    @property
    def production(self) -> bool:
        """Empty or ``production`` ENV is production; anything else is a dev-like mode."""
        return self.env.strip().lower() in ("", "production")

    def __attrs_post_init__(self) -> None:
        problems = cluster_problems(self.redis_host, self.redis_cluster, self.redis_db)
        problems += pubsub_problems(
            self.redis_pubsub, self.redis_cluster, self.redis_subscribe, self.channels
        )
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def redis_address(self) -> tuple[str, int]:
        """REDIS_HOST's server (with a cluster, the first node it names)."""
        return self.redis_addresses[0]

    @property
    def redis_addresses(self) -> list[tuple[str, int]]:
        return [split_host_port(item.strip()) for item in self.redis_host.split(",")]

    @property
    def redis_sentinel_addresses(self) -> list[tuple[str, int]]:
        return [split_host_port(item) for item in self.redis_sentinels]

    def warnings(self) -> list[str]:
        """Settings that are valid but cannot do what they look meant to do."""
        out = secret_warnings(self) + origin_warnings(self.allowed_origins)
        if not self.production and self.env.strip().lower().startswith("prod"):
            out.append(
                f"ENV={self.env!r} is not 'production': browsers' origins are checked as in"
                " development (localhost and DEV_ORIGIN_SUBNETS are let in)"
            )
        if self.redis_sentinel_password and not self.redis_sentinels:
            out.append("REDIS_SENTINEL_PASSWORD is set but REDIS_SENTINELS is empty: not used")
        if self.redis_sentinels and self.redis_host != _default("redis_host"):
            out.append(
                f"REDIS_HOST={self.redis_host} is not used: the master is the one"
                " REDIS_SENTINELS name"
            )
        if self.production and not self.allowed_origins:
            out.append(
                "ALLOWED_ORIGINS is empty and ENV is production: every browser is refused"
                " (403); list the web UI's origins, e.g. https://smap.tantai.dev"
            )
        return out

    def masked(self) -> dict[str, Any]:
        """The configuration as environment names and values, secrets masked."""
        out: dict[str, Any] = {}
        for field in attrs.fields(Config):
            value = getattr(self, field.name)
            if field.name in SECRET_FIELDS:
                value = "***" if value else ""
            elif isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, Channels):
                value = str(value)
            elif isinstance(value, Duration):
                value = format_duration(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"  # as written in the config
            out[field.name.upper()] = value
        return out


def _default(name: str) -> Any:
    return attrs.fields_dict(Config)[name].default


def secret_warnings(config: Config) -> list[str]:
    """HMAC secrets shorter than HS256's hash: the original took any, and so does this
    daemon (identity-srv signs with the same secret), but says so once, at start and on
    reload, instead of PyJWT's warning on the first token. Never the secret itself."""
    out = []
    for name in ("jwt_secret_key", "jwt_previous_secret_key"):
        size = len(getattr(config, name).encode())
        if 0 < size < MIN_SECRET_BYTES:
            out.append(
                f"{name.upper()} is {size} bytes long; RFC 7518 (section 3.2) asks at least"
                f" {MIN_SECRET_BYTES} for HS256: tokens signed with a shorter secret are"
                " easier to forge"
            )
    return out


def origin_warnings(origins: Iterable[str]) -> list[str]:
    """ALLOWED_ORIGINS entries that no browser's Origin header can equal (the policy
    compares exactly): a browser sends scheme://host[:port], in lower case, without the
    scheme's default port and without a path, not even a trailing slash."""
    out = []
    for origin in origins:
        as_sent = _as_origin(origin)
        if origin == as_sent or origin == "null":  # "null": sandboxed pages send that
            continue
        hint = f"; write {as_sent!r}" if as_sent else " (an origin is scheme://host[:port])"
        out.append(f"ALLOWED_ORIGINS: {origin!r} never equals a browser's Origin header{hint}")
    out += [
        f"ALLOWED_ORIGINS: {origin!r}: origins are compared exactly, '*' is no wildcard"
        " (list each origin)"
        for origin in origins
        if "*" in origin and _as_origin(origin) == origin
    ]
    return out


def _as_origin(text: str) -> str | None:
    """``text`` as a browser would send it in an Origin header, if it names an origin."""
    try:
        parts = urlsplit(text.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host or parts.username or parts.password:
        return None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")  # what browsers send: punycode
        except UnicodeError:
            return None
    host = f"[{host}]" if ":" in host else host
    default = 80 if scheme == "http" else 443
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def format_duration(seconds: float) -> str:
    """A duration as parse_duration reads it back: whole seconds, else milliseconds,
    microseconds or nanoseconds, whichever is exact (``500us``, not ``0ms``)."""
    ns = round(seconds * 1e9)
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    for unit, size in (("ms", 1_000_000), ("us", 1_000)):
        if ns % size == 0:
            return f"{ns // size}{unit}"
    return f"{ns}ns"


attrs.resolve_types(Config)
ENV_NAMES: Final = frozenset(field.name.upper() for field in attrs.fields(Config))

_converter: Final = cattrs.Converter()
_converter.register_structure_hook(Duration, lambda value, _t: parse_duration(value))
_converter.register_structure_hook(bool, lambda value, _t: parse_bool(value))
_converter.register_structure_hook(int, lambda value, _t: _parse_int(value))
_converter.register_structure_hook(str, lambda value, _t: str(value))
_converter.register_structure_hook(Channels, lambda value, _t: parse_channels(value))
_converter.register_structure_hook_func(
    lambda t: t == tuple[str, ...], lambda value, _t: _parse_list(value)
)


# A name in the config file with one of these prefixes that is no setting is most likely
# a typo, which would otherwise be ignored without a word.
_OWN_PREFIXES: Final = (
    "WS_",
    "REDIS_",
    "JWT_",
    "LOGGER_",
    "HTTP_",
    "ALLOWED_",
    "DEV_",
    "SHUTDOWN_",
    "RESYNC_",
    "DELIVER_",
    "CHANNEL",
)
# Read by the original and never used there (CONTRACT section 7): accepted without a word,
# as are its COOKIE_* settings.
ORIGINAL_UNUSED: Final = frozenset(
    {
        "REDIS_MAX_RETRIES",
        "REDIS_MIN_IDLE_CONNS",
        "REDIS_POOL_SIZE",
        "REDIS_POOL_TIMEOUT",
        "REDIS_CONN_MAX_IDLE_TIME",
        "REDIS_CONN_MAX_LIFETIME",
        "WS_MODE",
        "LOGGER_MODE",
        "LOGGER_ENCODING",
    }
)


# Settings whose empty value means something of its own (no origins, no subnets).
EMPTY_IS_A_VALUE: Final = frozenset({"ALLOWED_ORIGINS", "DEV_ORIGIN_SUBNETS"})


def config_warnings(config: Config, config_file: Path | None) -> list[str]:
    """What to warn about at start, on reload and in --check-config."""
    return config.warnings() + (file_warnings(config_file) if config_file else [])


def file_warnings(path: Path) -> list[str]:
    """Names in the config file that look like settings of ours but are none."""
    try:
        values, _ = _parse_env_file(path)  # its problems are load_config's to report
    except _Unreadable:
        return []
    return [
        f"{path}: {name} is not a setting of smap-notify and is ignored (a typo?)"
        for name in values
        if name not in ENV_NAMES and name not in ORIGINAL_UNUSED and name.startswith(_OWN_PREFIXES)
    ]


def read_env_file(path: Path) -> dict[str, str]:
    """Read KEY=VALUE lines (the systemd EnvironmentFile format; # comments, optional quotes)."""
    values, problems = _parse_env_file(path)
    if problems:
        raise ConfigError(problems)
    return values


class _Unreadable(ConfigError):
    """The config file cannot be read at all: what it sets is unknown."""


def _parse_env_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """The file's KEY=VALUE pairs and the problems of its lines; raises ``_Unreadable``."""
    values: dict[str, str] = {}
    problems: list[str] = []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _Unreadable([f"cannot read config file {path}: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8-sig")  # an editor's byte-order mark too
    except UnicodeDecodeError as exc:
        number = data.count(b"\n", 0, exc.start) + 1
        raise _Unreadable(
            [
                f"{path}:{number}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
            ]
        ) from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{path}:{number}: expected KEY=VALUE")
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values, problems


def cluster_problems(redis_host: str, cluster: bool, db: int) -> list[str]:
    """What REDIS_HOST and REDIS_DB cannot mean with (or without) REDIS_CLUSTER."""
    out = []
    if "," in redis_host and not cluster:
        out.append(
            "REDIS_HOST names several servers: only the nodes of a Redis Cluster"
            " (REDIS_CLUSTER=true); otherwise one host:port"
        )
    if cluster and db != 0:
        out.append(f"REDIS_DB must be 0 with REDIS_CLUSTER (a cluster has no other), got {db}")
    return out


def pubsub_problems(pubsub: str, cluster: bool, subscribe: str, channels: Channels) -> list[str]:
    """What REDIS_PUBSUB=sharded cannot serve: it needs a cluster, per-user subscriptions,
    and a channel (no pattern) for every template, since SSUBSCRIBE has no pattern form."""
    if pubsub != "sharded":
        return []
    out = []
    if not cluster:
        out.append("REDIS_PUBSUB=sharded needs REDIS_CLUSTER=true: sharded Pub/Sub is a cluster's")
    if subscribe != "user":
        out.append(
            "REDIS_PUBSUB=sharded needs REDIS_SUBSCRIBE=user: each user's channel is"
            " subscribed on the node owning its slot, and there is no sharded pattern"
        )
    for template in channels.templates:
        if template.has_user and template.topic is not None:
            out.append(
                f"REDIS_PUBSUB=sharded cannot serve CHANNELS template {template.spec!r}: a"
                f" connection without a {template.topic} filter needs a pattern subscription,"
                " and sharded Pub/Sub has none"
            )
        elif not template.has_user and template.fields:
            out.append(
                f"REDIS_PUBSUB=sharded cannot serve CHANNELS template {template.spec!r}: a"
                " broadcast template with placeholders needs a pattern subscription, and"
                " sharded Pub/Sub has none"
            )
    return out


def load_config(environ: Mapping[str, str], config_file: Path | None = None) -> Config:
    """Build the configuration from the environment, then the file (the file wins).

    Raises ConfigError listing every problem at once.
    """
    values = {k: val for k, val in environ.items() if k in ENV_NAMES}
    problems: list[str] = []
    if config_file is not None:
        from_file, problems = _parse_env_file(config_file)
        values.update({k: val for k, val in from_file.items() if k in ENV_NAMES})
    kwargs: dict[str, Any] = {}
    for field in attrs.fields(Config):
        name = field.name.upper()
        if name in values and not values[name].strip() and name not in EMPTY_IS_A_VALUE:
            # As the original (caarlos0/env): a setting present but empty takes its default.
            del values[name]
        if name in values:
            try:
                value = _converter.structure(values[name], field.type or str)
            except (ValueError, TypeError) as exc:
                # Some settings find several problems at once (CHANNELS): each is listed.
                problems += [f"{name}: {p}" for p in getattr(exc, "problems", [exc])]
                continue
        elif field.default is attrs.NOTHING:
            value = ""
        else:
            value = field.default
        if field.validator is not None:
            try:
                field.validator(None, field, value)
            except (ValueError, TypeError) as exc:
                problems.append(str(exc) if str(exc).startswith(name) else f"{name}: {exc}")
                continue
        kwargs[field.name] = value
    ping, pong = kwargs.get("ws_ping_interval"), kwargs.get("ws_pong_wait")
    if ping is not None and pong is not None and pong <= ping:
        problems.append(
            f"WS_PONG_WAIT ({format_duration(pong)}) must be longer than WS_PING_INTERVAL"
            f" ({format_duration(ping)}): a connection is dropped when nothing arrived for"
            " WS_PONG_WAIT, and the pong answers a ping"
        )
    if "redis_host" in kwargs and "redis_db" in kwargs:
        cluster = kwargs.get("redis_cluster", False)
        problems += cluster_problems(kwargs["redis_host"], cluster, kwargs["redis_db"])
        if "redis_subscribe" in kwargs and "redis_pubsub" in kwargs and "channels" in kwargs:
            problems += pubsub_problems(
                kwargs["redis_pubsub"], cluster, kwargs["redis_subscribe"], kwargs["channels"]
            )
        if cluster and kwargs.get("redis_sentinels"):
            problems.append(
                "REDIS_CLUSTER and REDIS_SENTINELS exclude each other: a cluster fails over"
                " by itself"
            )
    sentinels, master = kwargs.get("redis_sentinels"), kwargs.get("redis_sentinel_master")
    if sentinels and master == "":
        problems.append(
            "REDIS_SENTINEL_MASTER is required with REDIS_SENTINELS: the name the sentinels"
            " monitor (sentinel monitor <name> ...)"
        )
    if master and sentinels == ():
        problems.append(
            "REDIS_SENTINEL_MASTER needs REDIS_SENTINELS (host:port,host:port,...) to ask"
            " where that master is"
        )
    if problems:
        raise ConfigError(problems)
    return Config(**kwargs)
