"""The systemd units and the example environment file: verified, measured, consistent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smap_notify.config import ENV_NAMES, load_config

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = UNITS / "smap-notify.service"
SOCKET = UNITS / "smap-notify.socket"
TEMPLATE_SERVICE = UNITS / "smap-notify@.service"
TEMPLATE_SOCKET = UNITS / "smap-notify@.socket"
ENV_EXAMPLE = UNITS / "smap-notify.env.example"
MAX_EXPOSURE = 2.0

# The settings named in the brief of issue 5; config.ENV_NAMES may hold more.
SETTINGS = """
    WS_HOST WS_PORT ENV REDIS_HOST REDIS_PASSWORD REDIS_DB REDIS_USE_TLS WS_PING_INTERVAL
    WS_PONG_WAIT WS_WRITE_WAIT WS_MAX_MESSAGE_SIZE WS_MAX_CONNECTIONS WS_MAX_CONNECTIONS_PER_USER
    WS_SEND_BUFFER WS_SEND_BUFFER_BYTES WS_OVERFLOW_POLICY WS_HANDSHAKE_TIMEOUT JWT_SECRET_KEY
    JWT_PREVIOUS_SECRET_KEY COOKIE_NAME LOGGER_LEVEL ALLOWED_ORIGINS DEV_ORIGIN_SUBNETS
    SHUTDOWN_TIMEOUT RESYNC_ON_RECONNECT DELIVER_INVALID_PAYLOADS
""".split()
# Not settings: read from the process environment by libraries (OpenSSL).
PROCESS_ENV = {"SSL_CERT_FILE"}

requires_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze (Debian package systemd) is not installed",
)


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` to its values, in order; systemd allows a key more than once."""
    result: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        result.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return result


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit[key]
    assert len(values) == 1, f"{key} set {len(values)} times"
    return values[0]


def env_example() -> dict[str, str]:
    """Active and commented-out ``KEY=VALUE`` lines of the example environment file."""
    settings = {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", raw)
        if match:
            settings[match.group(1)] = match.group(2)
    return settings


def seconds(duration: str) -> float:
    """A systemd or Go duration of one unit (``30s``, ``1min``, ``1m``, ``500ms``)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|sec|m|min|h)?", duration)
    assert match, duration
    scale = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1}
    return float(match.group(1)) * scale[match.group(2)]


@pytest.fixture
def units_for_verify(tmp_path: Path) -> Path:
    """Copies of both units whose commands name an existing program (verify checks it)."""
    stub = tmp_path / "smap-notify"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for unit in (SERVICE, SOCKET, TEMPLATE_SERVICE, TEMPLATE_SOCKET):
        text = unit.read_text()
        text = text.replace("/opt/smap-notify/venv/bin/smap-notify", str(stub))
        (tmp_path / unit.name).write_text(text)
    return tmp_path


def analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_PAGER="", SYSTEMD_COLORS="0", LC_ALL="C.UTF-8")
    return subprocess.run(
        ["systemd-analyze", "--no-pager", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


@requires_analyze
def test_both_units_pass_systemd_analyze_verify_silently(units_for_verify: Path) -> None:
    # verify exits 0 on warnings such as an unknown key: any output is a failure.
    result = analyze(
        "verify",
        str(units_for_verify / SERVICE.name),
        str(units_for_verify / SOCKET.name),
        cwd=units_for_verify,
    )
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


@requires_analyze
def test_template_units_pass_systemd_analyze_verify_silently(units_for_verify: Path) -> None:
    # An instance's path next to the template: verify loads the template for it.
    result = analyze(
        "verify",
        str(units_for_verify / "smap-notify@1.service"),
        str(units_for_verify / "smap-notify@1.socket"),
        cwd=units_for_verify,
    )
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0
    broken = units_for_verify / TEMPLATE_SERVICE.name
    broken.write_text(broken.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    result = analyze("verify", str(units_for_verify / "smap-notify@1.service"))
    assert "sometimes" in result.stdout + result.stderr


@requires_analyze
def test_verify_would_catch_a_broken_unit(units_for_verify: Path) -> None:
    service = units_for_verify / SERVICE.name
    service.write_text(service.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    result = analyze("verify", str(service), cwd=units_for_verify)
    assert "sometimes" in result.stdout + result.stderr


@requires_analyze
@pytest.mark.parametrize(
    ("unit", "name"), [(SERVICE, SERVICE.name), (TEMPLATE_SERVICE, "smap-notify@1.service")]
)
def test_service_exposure_is_at_most_two(tmp_path: Path, unit: Path, name: str) -> None:
    # The offline check reads the unit file only; ExecStart need not exist.
    shutil.copy(unit, tmp_path / unit.name)
    service = tmp_path / name
    threshold = str(int(MAX_EXPOSURE * 10))  # --threshold uses the 0-100 scale
    result = analyze("security", "--offline=yes", f"--threshold={threshold}", str(service))
    output = result.stdout + result.stderr
    match = re.search(rf"Overall exposure level for {re.escape(name)}: (\d+\.\d)", output)
    assert match, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output
    assert result.returncode == 0, output


def test_service_is_notify_type_with_watchdog_and_socket() -> None:
    unit = parse_unit(SERVICE)
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"
    assert seconds(one(unit, "Service.WatchdogSec")) > 0
    assert one(unit, "Service.Restart") == "on-failure"
    check, signal = unit["Service.ExecReload"]
    assert check.split()[1:] == [
        "--config",
        one(unit, "Service.EnvironmentFile"),
        "--check-config",
        "--quiet",
    ]
    assert check.split()[0] == one(unit, "Service.ExecStart").split()[0]
    assert signal == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Service.DynamicUser") == "yes"
    assert one(unit, "Service.CapabilityBoundingSet") == ""
    assert "smap-notify.socket" in one(unit, "Unit.Requires").split()
    assert "smap-notify.socket" in one(unit, "Unit.After").split()


def test_the_template_service_is_the_service_but_for_its_instance() -> None:
    """Every setting of smap-notify.service holds for each instance too, so that the
    hardening, limits and reload of the two cannot drift apart."""
    single, template = parse_unit(SERVICE), parse_unit(TEMPLATE_SERVICE)
    per_instance = {"Unit.Description", "Unit.Requires", "Unit.After", "Install.Also"}
    assert sorted(template.pop("Service.Environment")) == sorted(
        [*single.pop("Service.Environment"), "ADMIN_PORT=910%i"]
    )
    assert {k: v for k, v in template.items() if k not in per_instance} == {
        k: v for k, v in single.items() if k not in per_instance
    }
    assert template["Unit.Requires"] == ["smap-notify@%i.socket"]
    assert template["Install.Also"] == ["smap-notify@%i.socket"]


def test_template_sockets_share_one_port() -> None:
    single, template = parse_unit(SOCKET), parse_unit(TEMPLATE_SOCKET)
    assert one(template, "Socket.ListenStream") == one(single, "Socket.ListenStream")
    assert one(template, "Socket.ReusePort") == "yes"
    assert one(template, "Socket.FileDescriptorName") == "ws"
    assert one(template, "Socket.Service") == "smap-notify@%i.service"


def test_service_reads_the_environment_file_it_reloads() -> None:
    unit = parse_unit(SERVICE)
    env_file = one(unit, "Service.EnvironmentFile").lstrip("-")
    assert env_file.startswith("/etc/smap-notify/")
    command = one(unit, "Service.ExecStart").split()
    assert command[command.index("--config") + 1] == env_file


def test_stop_timeout_outlasts_drain_window() -> None:
    unit = parse_unit(SERVICE)
    drain = seconds(env_example()["SHUTDOWN_TIMEOUT"])
    assert seconds(one(unit, "Service.TimeoutStopSec")) >= drain + 10


def test_file_limit_covers_connection_cap() -> None:
    unit = parse_unit(SERVICE)
    cap = int(env_example()["WS_MAX_CONNECTIONS"])
    assert int(one(unit, "Service.LimitNOFILE")) >= cap + 1000


def test_socket_listens_on_the_default_port_and_names_its_fd() -> None:
    unit = parse_unit(SOCKET)
    port = env_example()["WS_PORT"]
    assert one(unit, "Socket.ListenStream").rpartition(":")[2] == port
    assert one(unit, "Socket.FileDescriptorName") == "ws"
    assert one(unit, "Socket.Service") == SERVICE.name


def test_env_example_documents_every_setting() -> None:
    assert sorted((set(SETTINGS) | ENV_NAMES) - set(env_example())) == []
    assert sorted(set(env_example()) - ENV_NAMES - PROCESS_ENV) == []


def test_env_example_values_are_the_built_in_defaults() -> None:
    secret = {"JWT_SECRET_KEY": "s" * 32}
    assert load_config(secret, ENV_EXAMPLE) == load_config(secret)


def test_env_example_has_only_comments_and_assignments() -> None:
    for number, raw in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        if not raw or raw.startswith("#"):
            continue
        key, sep, value = raw.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"line {number}: {raw!r}"
        # systemd keeps a trailing "# ..." as part of the value.
        assert "#" not in value, f"line {number}: comment after a value"
        assert value == value.strip(), f"line {number}: surrounding blanks"


def test_env_example_carries_no_secret() -> None:
    active = {
        line.partition("=")[0]: line.partition("=")[2]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    }
    for key in (
        "JWT_SECRET_KEY",
        "JWT_PREVIOUS_SECRET_KEY",
        "REDIS_PASSWORD",
        "REDIS_SENTINEL_PASSWORD",
    ):
        assert active.get(key, "") == "", key


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

# What the daemon loads and does, run under MemoryDenyWriteExecute's rule.
MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, importlib, mmap, pkgutil, ssl
    import smap_notify
    for mod in pkgutil.walk_packages(smap_notify.__path__, "smap_notify."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    import trio, trio_websocket, redis, redis.asyncio, hiredis, jwt, prometheus_client
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        raise SystemExit("MDWE is not in force")
    except PermissionError:
        pass
    ssl.create_default_context()
    token = jwt.encode({"sub": "u"}, "k" * 32, algorithm="HS256")
    assert jwt.decode(token, "k" * 32, algorithms=["HS256"]) == {"sub": "u"}
    reader = hiredis.Reader()
    reader.feed(b"*2\\r\\n$3\\r\\nfoo\\r\\n:1\\r\\n")
    assert reader.gets() == [b"foo", 1]

    async def main():
        async def echo(request):
            ws = await request.accept()
            await ws.send_message(await ws.get_message())

        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, echo, "127.0.0.1", 0, None
            )
            port = server.port
            async with trio_websocket.open_websocket(
                "127.0.0.1", port, "/ws", use_ssl=False
            ) as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
            assert await trio.to_thread.run_sync(sum, range(4)) == 6
            nursery.cancel_scope.cancel()

    trio.run(main)
    print("ok")
    """
)

MDWE_WRAPPER = textwrap.dedent(
    f"""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
        sys.exit(100 + ctypes.get_errno())
    os.execv(sys.argv[1], sys.argv[1:])
    """
)


def mdwe_unsupported() -> str | None:
    """Why the kernel cannot apply PR_SET_MDWE, or None when it can."""
    # Probe in a child: the flag cannot be cleared once set.
    result = subprocess.run(
        [sys.executable, "-c", MDWE_WRAPPER, "/bin/true"], capture_output=True, timeout=30
    )
    if result.returncode == 0:
        return None
    code = result.returncode - 100
    return os.strerror(code) if code > 0 else result.stderr.decode()


def test_daemon_stack_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes holds for CPython, our modules and dependencies.

    The kernel's PR_SET_MDWE (Linux 6.3) applies the rule systemd's seccomp filter applies.
    """
    reason = mdwe_unsupported()
    if reason is not None:
        pytest.skip(f"kernel {os.uname().release} cannot apply PR_SET_MDWE: {reason}")
    probe = tmp_path / "probe.py"
    probe.write_text(MDWE_PROBE)
    result = subprocess.run(
        [sys.executable, "-c", MDWE_WRAPPER, sys.executable, str(probe)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
