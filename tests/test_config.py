"""Configuration: CONTRACT section 7 defaults, Go durations, every problem at once, --config."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from smap_notify import cli
from smap_notify.config import (
    DEV_SUBNETS,
    ENV_NAMES,
    PRODUCTION_ORIGINS,
    RESTART_FIELDS,
    Config,
    ConfigError,
    config_warnings,
    load_config,
    parse_duration,
    read_env_file,
)

SECRET = "test-secret-0123456789abcdef0123456789abcdef"
VALID = {"JWT_SECRET_KEY": SECRET}


def problems_of(environ: dict[str, str], path: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(environ, path)
    return info.value.problems


# -- defaults ------------------------------------------------------------------------------


def test_defaults_equal_contract_section_7() -> None:
    config = load_config(VALID)
    assert (config.ws_host, config.ws_port) == ("0.0.0.0", 8081)
    assert config.env == "production"
    assert config.redis_host == "localhost:6379"
    assert (config.redis_password, config.redis_db, config.redis_use_tls) == ("", 0, False)
    assert (config.ws_ping_interval, config.ws_pong_wait, config.ws_write_wait) == (30, 60, 10)
    assert config.ws_max_message_size == 512
    assert config.ws_max_connections == 10000
    assert config.jwt_secret_key == SECRET
    assert config.cookie_name == "smap_auth_token"
    assert config.logger_level == "info"
    assert config.ws_send_buffer == 256
    assert config.allowed_origins == PRODUCTION_ORIGINS
    assert config.dev_origin_subnets == DEV_SUBNETS


def test_default_allowed_origins_are_the_originals_list() -> None:
    assert set(PRODUCTION_ORIGINS) == {
        "https://smap.tantai.dev",
        "https://smap-api.tantai.dev",
        "http://smap.tantai.dev",
        "http://smap-api.tantai.dev",
    }
    assert set(DEV_SUBNETS) == {"172.16.21.0/24", "172.16.19.0/24", "192.168.1.0/24"}


def test_loaded_defaults_equal_the_attrs_defaults() -> None:
    assert load_config(VALID) == Config(jwt_secret_key=SECRET)


def test_every_environment_name_is_a_config_field_upper_cased() -> None:
    assert {f.name.upper() for f in attrs.fields(Config)} == ENV_NAMES
    for name in ("WS_HOST", "WS_PORT", "ENV", "REDIS_HOST", "JWT_SECRET_KEY", "COOKIE_NAME"):
        assert name in ENV_NAMES


def test_environment_values_are_converted_to_their_types() -> None:
    config = load_config(
        {
            **VALID,
            "WS_HOST": "127.0.0.1",
            "WS_PORT": " 9000 ",
            "ENV": "dev",
            "REDIS_HOST": "redis.internal:6380",
            "REDIS_PASSWORD": "pw",
            "REDIS_DB": "3",
            "REDIS_USE_TLS": "true",
            "WS_MAX_MESSAGE_SIZE": "1024",
            "WS_MAX_CONNECTIONS": "50",
            "COOKIE_NAME": "auth",
            "LOGGER_LEVEL": "debug",
            "ALLOWED_ORIGINS": "https://a.example, https://b.example,",
        }
    )
    assert (config.ws_host, config.ws_port, config.env) == ("127.0.0.1", 9000, "dev")
    assert config.redis_address == ("redis.internal", 6380)
    assert (config.redis_password, config.redis_db, config.redis_use_tls) == ("pw", 3, True)
    assert (config.ws_max_message_size, config.ws_max_connections) == (1024, 50)
    assert (config.cookie_name, config.logger_level) == ("auth", "debug")
    assert config.allowed_origins == ("https://a.example", "https://b.example")


def test_unrelated_environment_variables_are_ignored() -> None:
    config = load_config({**VALID, "PATH": "/bin", "REDIS_POOL_SIZE": "nonsense", "WS_MODE": "x"})
    assert config == Config(jwt_secret_key=SECRET)


@pytest.mark.parametrize("text", ["true", "TRUE", "1", "yes", "on"])
def test_true_booleans(text: str) -> None:
    assert load_config({**VALID, "REDIS_USE_TLS": text}).redis_use_tls is True


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "off", ""])
def test_false_booleans(text: str) -> None:
    assert load_config({**VALID, "REDIS_USE_TLS": text}).redis_use_tls is False


# -- Go durations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        (".5s", 0.5),
        ("10", 10.0),
        ("2.5", 2.5),
        ("1h2m3s", 3723.0),
        ("1.5m", 90.0),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("1000000ns", 0.001),
        (" 45s ", 45.0),
        # Go's time.ParseDuration reads these too (an outside audit found them refused):
        ("+30s", 30.0),
        ("+1m30s", 90.0),
        ("250\u03bcs", 0.00025),  # GREEK SMALL LETTER MU, beside MICRO SIGN above
    ],
)
def test_go_duration_is_parsed_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "abc", "30x", "s", "-5s", "1m 30s", "30S", "5s5", "1_0", "\u0663", "+", "++5s"],
)
def test_bad_duration_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text", ["nan", "inf", "Infinity", "9" * 400 + "s", "\u0663s", "1e308", "9" * 308 + "s"]
)
def test_non_finite_duration_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_nan_ping_interval_is_a_config_problem() -> None:
    assert any("WS_PING_INTERVAL" in p for p in problems_of({**VALID, "WS_PING_INTERVAL": "nan"}))


def test_durations_from_environment() -> None:
    config = load_config(
        {**VALID, "WS_PING_INTERVAL": "1m30s", "WS_PONG_WAIT": "2m", "WS_WRITE_WAIT": "500ms"}
    )
    assert (config.ws_ping_interval, config.ws_pong_wait, config.ws_write_wait) == (90, 120, 0.5)


def test_bad_duration_is_reported_with_its_name() -> None:
    problems = problems_of({**VALID, "WS_WRITE_WAIT": "soon"})
    assert len(problems) == 1
    assert problems[0].startswith("WS_WRITE_WAIT")
    assert "soon" in problems[0]


@pytest.mark.parametrize("name", ["WS_PING_INTERVAL", "WS_WRITE_WAIT", "WS_HANDSHAKE_TIMEOUT"])
def test_zero_duration_is_a_problem(name: str) -> None:
    assert any(p.startswith(name) for p in problems_of({**VALID, name: "0s"}))


# -- validation: every problem at once -----------------------------------------------------


def test_missing_jwt_secret_is_a_problem() -> None:
    problems = problems_of({})
    assert len(problems) == 1
    assert "JWT_SECRET_KEY" in problems[0]


def test_empty_jwt_secret_is_a_problem() -> None:
    assert any("JWT_SECRET_KEY" in p for p in problems_of({"JWT_SECRET_KEY": ""}))


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(
        {
            "WS_PORT": "eighty",
            "REDIS_HOST": "localhost",
            "REDIS_DB": "-1",
            "LOGGER_LEVEL": "loud",
            "WS_PING_INTERVAL": "often",
            "REDIS_USE_TLS": "maybe",
            "WS_OVERFLOW_POLICY": "explode",
            "DEV_ORIGIN_SUBNETS": "10.0.0.0/8,not-a-net",
        }
    )
    for name in (
        "WS_PORT",
        "REDIS_HOST",
        "REDIS_DB",
        "LOGGER_LEVEL",
        "WS_PING_INTERVAL",
        "REDIS_USE_TLS",
        "WS_OVERFLOW_POLICY",
        "DEV_ORIGIN_SUBNETS",
        "JWT_SECRET_KEY",
    ):
        assert sum(name in p for p in problems) == 1, (name, problems)
    assert len(problems) == 9
    assert str(ConfigError(problems)) == "; ".join(problems)


@pytest.mark.parametrize("value", ["65536", "-1", "x"])
def test_bad_port_is_a_problem(value: str) -> None:
    assert any(p.startswith("WS_PORT") for p in problems_of({**VALID, "WS_PORT": value}))


@pytest.mark.parametrize(
    "value",
    [
        "localhost",
        ":6379",
        "localhost:",
        "localhost:0",
        "h:99999",
        "h:\u0668\u0660",  # Arabic-Indic digits: int() reads them, a port is ASCII
        "redis://cache:6379",
        "local host:6379",
        "127.0.0.1 :6379",
        "a..b:6379",
        "-cache:6379",
        "my_cache:6379",
        f"{'a' * 64}.example:6379",
        "[::1:6379",
        "[127.0.0.1]:6379",
        "[cache]:6379",
    ],
)
def test_redis_host_must_be_host_and_port(value: str) -> None:
    assert any(p.startswith("REDIS_HOST") for p in problems_of({**VALID, "REDIS_HOST": value}))


@pytest.mark.parametrize(
    "value",
    [
        "default:hunter2@cache:6379",
        "redis://:hunter2@cache:6379",
        "hunter2@cache:6379",
        "redis://cache:6379?password=hunter2",
    ],
)
def test_redis_host_with_credentials_is_refused_without_repeating_them(value: str) -> None:
    problems = [p for p in problems_of({**VALID, "REDIS_HOST": value}) if "REDIS_HOST" in p]
    assert len(problems) == 1
    assert "hunter2" not in problems[0]
    assert "REDIS_PASSWORD" in problems[0]


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("cache.internal:6380", ("cache.internal", 6380)),
        ("cache.internal.:6380", ("cache.internal.", 6380)),
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("[2001:db8::5]:6379", ("2001:db8::5", 6379)),
        ("2001:db8::5:6379", ("2001:db8::5", 6379)),
    ],
)
def test_redis_host_accepts_names_and_addresses(value: str, address: tuple[str, int]) -> None:
    assert load_config({**VALID, "REDIS_HOST": value}).redis_address == address


@pytest.mark.parametrize("value", ["0.0.0.0:8081", "[::]", "-host", "my_host", "a b"])
def test_ws_host_must_be_an_address_or_host_name(value: str) -> None:
    """A bad WS_HOST is a configuration error (78), not a crash at bind time (70), which
    systemd would restart over and over."""
    problems = problems_of({**VALID, "WS_HOST": value})
    assert any(p.startswith("WS_HOST") and repr(value) in p for p in problems)


@pytest.mark.parametrize("value", ["0.0.0.0", "::", "127.0.0.1", "::1", "localhost", "h-1.lan."])
def test_ws_host_takes_addresses_and_host_names(value: str) -> None:
    assert load_config({**VALID, "WS_HOST": value}).ws_host == value


@pytest.mark.parametrize(
    ("origin", "hint"),
    [
        ("https://smap.tantai.dev/", "; write 'https://smap.tantai.dev'"),
        ("https://SMAP.tantai.dev", "; write 'https://smap.tantai.dev'"),
        ("https://smap.tantai.dev:443", "; write 'https://smap.tantai.dev'"),
        ("http://[::1]:80/app", "; write 'http://[::1]'"),
        ("https://bücher.example", "; write 'https://xn--bcher-kva.example'"),
        ("smap.tantai.dev", " (an origin is scheme://host[:port])"),
        ("*", " (an origin is scheme://host[:port])"),
    ],
)
def test_an_allowed_origin_no_browser_sends_is_warned_about(origin: str, hint: str) -> None:
    """The policy compares exactly, so such an entry refuses the very site it names."""
    config = load_config({**VALID, "ALLOWED_ORIGINS": f"https://ok.example,{origin}"})
    assert config.allowed_origins == ("https://ok.example", origin), "kept as written"
    assert config.warnings() == [
        f"ALLOWED_ORIGINS: {origin!r} never equals a browser's Origin header{hint}"
    ]


@pytest.mark.parametrize("origin", ["https://*.smap.tantai.dev", "https://smap-*.tantai.dev"])
def test_a_wildcard_in_an_allowed_origin_is_warned_about(origin: str) -> None:
    config = load_config({**VALID, "ALLOWED_ORIGINS": origin})
    assert config.warnings() == [
        f"ALLOWED_ORIGINS: {origin!r}: origins are compared exactly, '*' is no wildcard"
        " (list each origin)"
    ]


@pytest.mark.parametrize("env", ["prod", "Prod", "prodution", "production-eu"])
def test_an_env_that_looks_like_production_but_is_not_is_warned_about(env: str) -> None:
    # Anything but "production" (or empty) relaxes the origin policy, as the original did.
    config = load_config({**VALID, "ENV": env})
    assert not config.production
    assert config.warnings() == [
        f"ENV={env!r} is not 'production': browsers' origins are checked as in development"
        " (localhost and DEV_ORIGIN_SUBNETS are let in)"
    ]
    assert load_config({**VALID, "ENV": "dev"}).warnings() == []
    assert load_config({**VALID, "ENV": "staging"}).warnings() == []


def test_a_secret_shorter_than_hs256_asks_is_warned_about_by_length_only() -> None:
    config = load_config({"JWT_SECRET_KEY": "dev-secret", "JWT_PREVIOUS_SECRET_KEY": "x" * 32})
    assert config.warnings() == [
        "JWT_SECRET_KEY is 10 bytes long; RFC 7518 (section 3.2) asks at least 32 for HS256:"
        " tokens signed with a shorter secret are easier to forge"
    ]
    assert load_config({"JWT_SECRET_KEY": "y" * 32}).warnings() == []


@pytest.mark.parametrize(
    "origin", ["https://smap.tantai.dev", "http://localhost:3000", "http://[::1]:8080", "null"]
)
def test_origins_as_browsers_send_them_give_no_warning(origin: str) -> None:
    assert load_config({**VALID, "ALLOWED_ORIGINS": origin}).warnings() == []


@pytest.mark.parametrize("env", ["production", ""])
def test_an_empty_origin_list_in_production_is_warned_about(env: str) -> None:
    config = load_config({**VALID, "ENV": env, "ALLOWED_ORIGINS": ""})
    assert config.warnings() == [
        "ALLOWED_ORIGINS is empty and ENV is production: every browser is refused (403);"
        " list the web UI's origins, e.g. https://smap.tantai.dev"
    ]
    assert load_config({**VALID, "ENV": "dev", "ALLOWED_ORIGINS": ""}).warnings() == []


def test_redis_host_accepts_bracketed_ipv6() -> None:
    assert load_config({**VALID, "REDIS_HOST": "[::1]:6379"}).redis_address == ("::1", 6379)


@pytest.mark.parametrize("level", ["debug", "info", "warn", "error", "INFO"])
def test_logger_levels_of_the_original_are_accepted(level: str) -> None:
    assert load_config({**VALID, "LOGGER_LEVEL": level}).logger_level == level.lower()


@pytest.mark.parametrize("policy", ["Disconnect", "DISCONNECT", " disconnect"[1:]])
def test_a_choice_in_capitals_is_stored_as_the_code_compares_it(policy: str) -> None:
    """WS_OVERFLOW_POLICY=Disconnect was accepted, then compared with "disconnect" by the
    hub: the daemon dropped frames instead of disconnecting."""
    assert load_config({**VALID, "WS_OVERFLOW_POLICY": policy}).ws_overflow_policy == "disconnect"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"WS_PORT": "abc"}, "WS_PORT: not a whole number: 'abc'"),
        ({"WS_PORT": "8o81"}, "WS_PORT: not a whole number: '8o81'"),
        ({"WS_PORT": "8_081"}, "WS_PORT: not a whole number: '8_081'"),
        (
            {"WS_PORT": "\u0668\u0660\u0668\u0661"},
            "WS_PORT: not a whole number: '\u0668\u0660\u0668\u0661'",
        ),
        ({"REDIS_DB": "-1"}, "REDIS_DB must be at least 0, got -1"),
        ({"HTTP_MAX_HEADER_SIZE": "100"}, "HTTP_MAX_HEADER_SIZE must be at least 1024, got 100"),
    ],
)
def test_number_problems_are_said_in_the_settings_terms(env: dict[str, str], problem: str) -> None:
    assert problems_of({**VALID, **env}) == [problem]


def test_a_setting_present_but_empty_takes_its_default_as_in_the_original() -> None:
    """caarlos0/env (v7+), which the original read its settings with, falls back to the
    default for an empty variable: an env file with WS_PORT= worked there."""
    empty = dict.fromkeys(ENV_NAMES - {"JWT_SECRET_KEY"}, " ")
    defaults = Config(jwt_secret_key=SECRET)
    loaded = load_config({**VALID, **empty})
    assert attrs.evolve(loaded, allowed_origins=(), dev_origin_subnets=()) == attrs.evolve(
        defaults, allowed_origins=(), dev_origin_subnets=()
    )
    # Empty means something for these two: no origins (warned about), no subnets.
    assert (loaded.allowed_origins, loaded.dev_origin_subnets) == ((), ())
    assert problems_of({**VALID, "JWT_SECRET_KEY": ""}) != []  # required stays required


@pytest.mark.parametrize("text", ["500us", "900us", "1500us", "3ns", "1500ms", "30s", "2h"])
def test_durations_are_shown_as_they_read_back(text: str) -> None:
    """--check-config showed 500us as 0ms, which is itself refused (outside audit)."""
    shown = load_config({**VALID, "WS_WRITE_WAIT": text}).masked()["WS_WRITE_WAIT"]
    assert shown == text.replace("2h", "7200s")
    assert parse_duration(shown) == parse_duration(text)


@pytest.mark.parametrize(
    "name", ["RESYNC_ON_DROP", "WS_PORT", "WS_PING_INTERVAL", "WS_HOST", "REDIS_HOST"]
)
def test_a_long_bad_value_is_not_repeated_whole(name: str) -> None:
    """A 10 KB value made a 10 KB problem line (outside audit)."""
    (problem,) = [p for p in problems_of({**VALID, name: "9" * 10_000 + " x"}) if name in p]
    assert len(problem) < 300, problem
    assert "(10002 characters)" in problem


def test_check_config_style_values_are_written_as_the_config_writes_them() -> None:
    masked = load_config({**VALID, "REDIS_USE_TLS": "yes"}).masked()
    assert (masked["REDIS_USE_TLS"], masked["RESYNC_ON_DROP"]) == ("true", "true")
    assert load_config({**VALID, "RESYNC_ON_DROP": "0"}).masked()["RESYNC_ON_DROP"] == "false"


@pytest.mark.parametrize(
    ("ping", "pong"), [("30s", "30s"), ("30s", "10s"), ("1m", "59s"), ("2m", "1m")]
)
def test_pong_wait_must_exceed_ping_interval(ping: str, pong: str) -> None:
    problems = problems_of({**VALID, "WS_PING_INTERVAL": ping, "WS_PONG_WAIT": pong})
    assert len(problems) == 1
    assert (
        problems[0].startswith("WS_PONG_WAIT (")
        and "must be longer than WS_PING_INTERVAL (" in problems[0]
    )


def test_the_pong_wait_problem_shows_both_values() -> None:
    problems = problems_of({**VALID, "WS_PING_INTERVAL": "30s", "WS_PONG_WAIT": "10s"})
    assert problems[0].startswith("WS_PONG_WAIT (10s) must be longer than WS_PING_INTERVAL (30s)")


def test_pong_wait_just_above_ping_interval_is_valid() -> None:
    config = load_config({**VALID, "WS_PING_INTERVAL": "30s", "WS_PONG_WAIT": "30001ms"})
    assert config.ws_pong_wait > config.ws_ping_interval


def test_pong_wait_problem_is_reported_with_the_other_problems() -> None:
    problems = problems_of({"WS_PONG_WAIT": "10s"})
    assert any("JWT_SECRET_KEY" in p for p in problems)
    assert any("WS_PONG_WAIT" in p for p in problems)


# -- ENV and production --------------------------------------------------------------------


@pytest.mark.parametrize("env", ["", "production", "Production", " production "])
def test_empty_or_production_env_is_production(env: str) -> None:
    assert Config(jwt_secret_key=SECRET, env=env).production


@pytest.mark.parametrize("env", ["dev", "staging", "anything", "prod", "development"])
def test_other_env_values_are_not_production(env: str) -> None:
    assert not Config(jwt_secret_key=SECRET, env=env).production


def test_empty_env_variable_loads_as_production() -> None:
    assert load_config({**VALID, "ENV": ""}).production


# -- masking -------------------------------------------------------------------------------


def test_masked_never_shows_secrets() -> None:
    config = Config(
        jwt_secret_key="current-secret-value",
        jwt_previous_secret_key="previous-secret-value",
        redis_password="redis-password-value",
    )
    masked = config.masked()
    text = repr(masked) + repr(config)
    for secret in ("current-secret-value", "previous-secret-value", "redis-password-value"):
        assert secret not in text
    assert masked["JWT_SECRET_KEY"] == "***"
    assert masked["JWT_PREVIOUS_SECRET_KEY"] == "***"
    assert masked["REDIS_PASSWORD"] == "***"


def test_masked_shows_empty_secrets_as_empty() -> None:
    masked = Config(jwt_secret_key=SECRET).masked()
    assert masked["REDIS_PASSWORD"] == ""
    assert masked["JWT_PREVIOUS_SECRET_KEY"] == ""


def test_masked_uses_environment_names_and_readable_values() -> None:
    masked = load_config({**VALID, "WS_WRITE_WAIT": "500ms"}).masked()
    assert set(masked) == ENV_NAMES
    assert masked["WS_PING_INTERVAL"] == "30s"
    assert masked["WS_WRITE_WAIT"] == "500ms"
    assert masked["WS_PORT"] == 8081
    assert masked["ALLOWED_ORIGINS"] == ",".join(PRODUCTION_ORIGINS)


def test_masked_values_load_back_to_the_same_config() -> None:
    original = load_config(
        {**VALID, "ENV": "dev", "WS_PING_INTERVAL": "1m30s", "WS_PONG_WAIT": "2m"}
    )
    environ = {k: str(v) for k, v in original.masked().items()}
    environ["JWT_SECRET_KEY"] = SECRET
    assert load_config(environ) == original


# -- the --config file ---------------------------------------------------------------------


def test_read_env_file_handles_comments_quotes_and_export(tmp_path: Path) -> None:
    path = tmp_path / "smap-notify.env"
    path.write_text(
        "# a comment\n"
        "; another comment\n"
        "\n"
        "WS_PORT=9001\n"
        "  export ENV=dev\n"
        'JWT_SECRET_KEY="quoted secret"\n'
        "COOKIE_NAME='single'\n"
        "REDIS_PASSWORD = spaced \n"
        "ALLOWED_ORIGINS=https://a.example,https://b.example\n"
        'LOGGER_LEVEL="debug\n'
        "EMPTY=\n"
        "WITH_EQUALS=a=b=c\n"
    )
    assert read_env_file(path) == {
        "WS_PORT": "9001",
        "ENV": "dev",
        "JWT_SECRET_KEY": "quoted secret",
        "COOKIE_NAME": "single",
        "REDIS_PASSWORD": "spaced",
        "ALLOWED_ORIGINS": "https://a.example,https://b.example",
        "LOGGER_LEVEL": '"debug',
        "EMPTY": "",
        "WITH_EQUALS": "a=b=c",
    }


def test_read_env_file_reports_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.env"
    path.write_text("GOOD=1\njust words\n=value\nALSO_GOOD=2\n")
    with pytest.raises(ConfigError) as info:
        read_env_file(path)
    assert info.value.problems == [f"{path}:2: expected KEY=VALUE", f"{path}:3: expected KEY=VALUE"]


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(VALID, tmp_path / "absent.env")
    assert len(info.value.problems) == 1
    assert "absent.env" in info.value.problems[0]


def test_config_file_with_a_byte_order_mark_reads_its_first_line(tmp_path: Path) -> None:
    path = tmp_path / "smap-notify.env"
    path.write_bytes(b"\xef\xbb\xbfJWT_SECRET_KEY=from-the-file\n")
    assert load_config({}, path).jwt_secret_key == "from-the-file"


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (b"JWT_SECRET_KEY=x\n# caf\xe9\n", ":2: not UTF-8 text (byte 0xe9)"),
        ("JWT_SECRET_KEY=x\n".encode("utf-16"), ":1: not UTF-8 text (byte 0xff)"),
    ],
)
def test_config_file_that_is_not_utf8_is_a_config_error(
    tmp_path: Path, data: bytes, where: str
) -> None:
    path = tmp_path / "smap-notify.env"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(VALID, path)
    assert info.value.problems == [f"{path}{where}; save the file as UTF-8"]
    # What the file sets is unknown: its secret is not reported missing as well.
    with pytest.raises(ConfigError) as info:
        load_config({}, path)
    assert info.value.problems == [f"{path}{where}; save the file as UTF-8"]


def test_config_file_names_that_look_like_settings_but_are_none_are_warned_about(
    tmp_path: Path,
) -> None:
    path = tmp_path / "smap-notify.env"
    path.write_text(
        f"JWT_SECRET_KEY={SECRET}\nWS_PORTT=9000\nREDIS_HOSTNAME=cache\n"
        "REDIS_POOL_SIZE=10\nCOOKIE_DOMAIN=smap.tantai.dev\nTZ=UTC\n"
    )
    assert config_warnings(load_config({}, path), path) == [
        f"{path}: WS_PORTT is not a setting of smap-notify and is ignored (a typo?)",
        f"{path}: REDIS_HOSTNAME is not a setting of smap-notify and is ignored (a typo?)",
    ]


def test_config_file_values_win_over_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "smap-notify.env"
    path.write_text("WS_PORT=9100\nENV=staging\nJWT_SECRET_KEY=from-file\n")
    config = load_config(
        {"WS_PORT": "9000", "ENV": "production", "JWT_SECRET_KEY": "from-env", "COOKIE_NAME": "c"},
        path,
    )
    assert (config.ws_port, config.env, config.jwt_secret_key) == (9100, "staging", "from-file")
    # Names the file does not set still come from the environment.
    assert config.cookie_name == "c"


def test_config_file_can_supply_the_missing_secret(tmp_path: Path) -> None:
    path = tmp_path / "smap-notify.env"
    path.write_text(f"export JWT_SECRET_KEY='{SECRET}'\n")
    assert load_config({}, path).jwt_secret_key == SECRET


def test_config_file_problems_are_reported_like_environment_problems(tmp_path: Path) -> None:
    path = tmp_path / "smap-notify.env"
    path.write_text("WS_PORT=nope\nWS_PONG_WAIT=later\n")
    problems = problems_of(VALID, path)
    assert [p.split(":")[0] for p in problems] == ["WS_PORT", "WS_PONG_WAIT"]


# -- the command line ----------------------------------------------------------------------


CheckConfig = Callable[..., tuple[int, str, str]]


@pytest.fixture
def check_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> CheckConfig:
    """``smap-notify [ARGS] --check-config`` with only ``env`` set: (status, stdout, stderr)."""

    def run(*args: str, **env: str) -> tuple[int, str, str]:
        for name in ENV_NAMES:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        status = cli.main([*args, "--check-config"])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_check_config_prints_masked_config_and_exits_0(check_config: CheckConfig) -> None:
    status, out, err = check_config(
        JWT_SECRET_KEY="very-secret-cli-value",
        REDIS_PASSWORD="redis-cli-password",
        WS_PORT="9002",
    )
    assert status == 0
    assert "very-secret-cli-value" not in out + err
    assert "redis-cli-password" not in out + err
    lines = dict(line.split("=", 1) for line in out.splitlines())
    assert set(lines) == ENV_NAMES
    assert lines["JWT_SECRET_KEY"] == "***"
    assert lines["REDIS_PASSWORD"] == "***"
    assert lines["WS_PORT"] == "9002"
    assert lines["ENV"] == "production"


def test_version_is_the_installed_package_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"smap-notify {importlib.metadata.version('smap-notify')}\n"


def test_a_wrong_command_line_exits_64_which_the_unit_does_not_restart(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # argparse's own 2 is restarted by Restart=on-failure until the start limit.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--conifg", "x"])
    assert exit_.value.code == 64
    assert "unrecognized arguments: --conifg x" in capsys.readouterr().err
    unit = (Path(__file__).parent.parent / "systemd" / "smap-notify.service").read_text()
    assert "RestartPreventExitStatus=64 78\n" in unit


def test_check_config_warns_about_origins_no_browser_sends(check_config: CheckConfig) -> None:
    status, out, err = check_config(JWT_SECRET_KEY=SECRET, ALLOWED_ORIGINS="https://app.example/")
    assert status == 0
    assert "ALLOWED_ORIGINS=https://app.example/" in out.splitlines()
    assert err == (
        "smap-notify: warning: ALLOWED_ORIGINS: 'https://app.example/' never equals a"
        " browser's Origin header; write 'https://app.example'\n"
    )


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("192.0.2.10", "Cannot assign requested address"),  # TEST-NET-1: no host has it
        ("no-such-host.invalid", "WS_HOST does not resolve"),
    ],
)
def test_check_config_warns_about_a_ws_host_this_machine_cannot_listen_on(
    check_config: CheckConfig, host: str, why: str
) -> None:
    """The daemon exits 78 on such a WS_HOST; --check-config used to pass it silently. A
    warning, not an error: socket activation does not use WS_HOST."""
    status, _, err = check_config(JWT_SECRET_KEY=SECRET, WS_HOST=host)
    assert status == 0
    assert err == (
        f"smap-notify: warning: WS_HOST={host}: cannot listen on {host}: {why};"
        " started without smap-notify.socket, the daemon would exit with 78\n"
    )
    assert check_config(JWT_SECRET_KEY=SECRET, WS_HOST="127.0.0.1")[2] == ""


def test_check_config_names_an_ipv6_ws_host_as_given(check_config: CheckConfig) -> None:
    """The message was once cut at its first ":0:", inside the address."""
    status, _, err = check_config(JWT_SECRET_KEY=SECRET, WS_HOST="2001:db8:0:1::5")
    assert status == 0
    assert "WS_HOST=2001:db8:0:1::5: cannot listen on 2001:db8:0:1::5: " in err


def test_check_config_exits_78_listing_every_problem(check_config: CheckConfig) -> None:
    status, out, err = check_config(WS_PORT="eighty", LOGGER_LEVEL="loud")
    assert status == 78
    assert out == ""
    problem_lines = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problem_lines) == 3
    for name in ("WS_PORT", "LOGGER_LEVEL", "JWT_SECRET_KEY"):
        assert any(name in line for line in problem_lines)


def test_quiet_check_config_prints_nothing_for_a_valid_configuration(
    check_config: CheckConfig,
) -> None:
    # ExecReload= runs it before each SIGHUP: the daemon logs the reload itself.
    assert check_config("--quiet", JWT_SECRET_KEY=SECRET, ALLOWED_ORIGINS="https://a.example/") == (
        0,
        "",
        "",
    )


def test_quiet_check_config_still_lists_every_problem_and_exits_78(
    check_config: CheckConfig,
) -> None:
    status, out, err = check_config("--quiet", WS_PORT="eighty")
    assert status == 78
    assert out == ""
    assert "  - WS_PORT" in err


def test_quiet_without_check_config_is_a_wrong_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--quiet"])
    assert exit_.value.code == 64
    assert "--quiet goes with --check-config" in capsys.readouterr().err


def test_check_config_reads_the_config_file(check_config: CheckConfig, tmp_path: Path) -> None:
    path = tmp_path / "smap-notify.env"
    path.write_text(f"JWT_SECRET_KEY=file-{SECRET}\nWS_PORT=9003\nWS_PING_INTERVL=5s\n")
    status, out, err = check_config("--config", str(path), WS_PORT="9000")
    assert status == 0
    assert "WS_PORT=9003" in out.splitlines()
    assert f"file-{SECRET}" not in out
    assert err == (
        f"smap-notify: warning: {path}: WS_PING_INTERVL is not a setting of smap-notify and"
        " is ignored (a typo?)\n"
    )


# -- Redis Sentinel ------------------------------------------------------------------------

SENTINEL = {
    **VALID,
    "REDIS_SENTINELS": "10.0.0.1:26379, sentinel-b.internal:26379,[2001:db8::3]:26379",
    "REDIS_SENTINEL_MASTER": "mymaster",
}


def test_sentinel_settings_are_parsed() -> None:
    config = load_config({**SENTINEL, "REDIS_SENTINEL_PASSWORD": "s3cret"})
    assert config.redis_sentinel_addresses == [
        ("10.0.0.1", 26379),
        ("sentinel-b.internal", 26379),
        ("2001:db8::3", 26379),
    ]
    assert config.redis_sentinel_master == "mymaster"
    masked = config.masked()
    assert (
        masked["REDIS_SENTINELS"] == "10.0.0.1:26379,sentinel-b.internal:26379,[2001:db8::3]:26379"
    )
    assert masked["REDIS_SENTINEL_PASSWORD"] == "***"
    assert "s3cret" not in repr(masked) + repr(config)


def test_without_sentinels_nothing_changes() -> None:
    config = load_config(VALID)
    assert (config.redis_sentinels, config.redis_sentinel_master) == ((), "")


@pytest.mark.parametrize("value", ["10.0.0.1", "10.0.0.1:26379,cache", "h:0", "a b:1"])
def test_each_sentinel_must_be_host_and_port(value: str) -> None:
    problems = problems_of({**SENTINEL, "REDIS_SENTINELS": value})
    assert any(p.startswith("REDIS_SENTINELS: each must be host:port") for p in problems), problems


def test_sentinel_with_credentials_is_refused_without_repeating_them() -> None:
    problems = problems_of({**SENTINEL, "REDIS_SENTINELS": "user:hunter2@s:26379"})
    assert len(problems) == 1 and "hunter2" not in problems[0]
    assert "REDIS_SENTINEL_PASSWORD" in problems[0]


def test_sentinels_need_a_master_name_and_the_name_needs_sentinels() -> None:
    problems = problems_of({**SENTINEL, "REDIS_SENTINEL_MASTER": ""})
    assert any(p.startswith("REDIS_SENTINEL_MASTER is required") for p in problems), problems
    problems = problems_of({**VALID, "REDIS_SENTINEL_MASTER": "mymaster"})
    assert any(p.startswith("REDIS_SENTINEL_MASTER needs REDIS_SENTINELS") for p in problems)


@pytest.mark.parametrize("value", ["my master", "m\x1b[2J", "mästare"])
def test_sentinel_master_name_is_one_printable_word(value: str) -> None:
    problems = problems_of({**SENTINEL, "REDIS_SENTINEL_MASTER": value})
    assert any(p.startswith("REDIS_SENTINEL_MASTER must be") for p in problems), problems


def test_sentinel_settings_need_a_restart() -> None:
    assert {"redis_sentinels", "redis_sentinel_master", "redis_sentinel_password"} <= (
        RESTART_FIELDS
    )


def test_sentinel_settings_that_do_nothing_are_warned_about() -> None:
    config = load_config({**SENTINEL, "REDIS_HOST": "cache:6379"})
    assert any("REDIS_HOST=cache:6379 is not used" in w for w in config.warnings())
    config = load_config({**VALID, "REDIS_SENTINEL_PASSWORD": "x"})
    assert any("REDIS_SENTINEL_PASSWORD is set" in w for w in config.warnings())
    assert not load_config(SENTINEL).warnings()


def test_check_config_shows_the_sentinel_settings(check_config: CheckConfig) -> None:
    status, out, err = check_config(
        JWT_SECRET_KEY=SECRET,
        REDIS_SENTINELS="127.0.0.1:26379,127.0.0.1:26380",
        REDIS_SENTINEL_MASTER="mymaster",
        REDIS_SENTINEL_PASSWORD="sentinel-cli-password",
    )
    assert status == 0
    lines = dict(line.split("=", 1) for line in out.splitlines())
    assert lines["REDIS_SENTINELS"] == "127.0.0.1:26379,127.0.0.1:26380"
    assert lines["REDIS_SENTINEL_MASTER"] == "mymaster"
    assert lines["REDIS_SENTINEL_PASSWORD"] == "***"
    assert "sentinel-cli-password" not in out + err


SHARDED = {"JWT_SECRET_KEY": "s" * 32, "REDIS_PUBSUB": "sharded", "REDIS_HOST": "10.0.0.1:7000"}


def test_sharded_pubsub_needs_a_cluster_and_per_user_subscriptions() -> None:
    assert load_config(VALID).redis_pubsub == "classic"
    with pytest.raises(ConfigError) as error:
        load_config(SHARDED)
    assert error.value.problems == [
        "REDIS_PUBSUB=sharded needs REDIS_CLUSTER=true: sharded Pub/Sub is a cluster's",
        "REDIS_PUBSUB=sharded needs REDIS_SUBSCRIBE=user: each user's channel is subscribed"
        " on the node owning its slot, and there is no sharded pattern",
    ]
    config = load_config({**SHARDED, "REDIS_CLUSTER": "true", "REDIS_SUBSCRIBE": "user"})
    assert config.redis_pubsub == "sharded"
    with pytest.raises(ConfigError, match="REDIS_PUBSUB must be one of"):
        load_config({**SHARDED, "REDIS_PUBSUB": "spublish"})
    assert "redis_pubsub" in RESTART_FIELDS


def test_sharded_pubsub_refuses_templates_that_need_a_pattern_naming_them() -> None:
    env = {**SHARDED, "REDIS_CLUSTER": "true", "REDIS_SUBSCRIBE": "user"}
    load_config({**env, "CHANNELS": "user_noti:{user},notices"})  # a channel each: served
    with pytest.raises(ConfigError) as error:
        load_config({**env, "CHANNELS": "user_noti:{user},t:{user}:{kind},region:{region}"})
    problems = error.value.problems
    assert len(problems) == 2
    assert "'t:{user}:{kind}'" in problems[0] and "without a kind filter" in problems[0]
    assert "'region:{region}'" in problems[1] and "broadcast template" in problems[1]


def test_check_config_names_a_sharded_pubsub_problem(check_config: CheckConfig) -> None:
    status, _, err = check_config(JWT_SECRET_KEY="s" * 32, REDIS_PUBSUB="sharded")
    assert status == 78
    assert "REDIS_PUBSUB=sharded needs REDIS_CLUSTER=true" in err
