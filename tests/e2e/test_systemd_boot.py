"""The units under a real systemd 252 (PID 1 in a container), installed as README.rst's
"Deploying with systemd" says: serving, reload, restarts, the start limit, the watchdog.

Skipped where systemd-nspawn cannot run (tests/support/nspawn.py says why). The container
has its own loopback: port 8081 and its Redis never meet the host's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.support.daemon import DEV_ORIGIN, SECRET, make_token
from tests.support.nspawn import Container, Unavailable, booted, why_unavailable

REPO: Final = Path(__file__).resolve().parents[2]
SOURCE: Final = "/usr/local/src/smap-notify"  # the repository, copied into the container
NETPROBE: Final = str(Path(__file__).resolve().parents[1] / "support" / "netprobe.py")
PORT: Final = 8081
REDIS_PORT: Final = 6390
VENV: Final = "/opt/smap-notify/venv"
ENV_FILE: Final = "/etc/smap-notify/smap-notify.env"
GOOD_CONFIG: Final = f"JWT_SECRET_KEY={SECRET}\nREDIS_HOST=127.0.0.1:{REDIS_PORT}\nENV=dev\n"
SERVICE: Final = "smap-notify.service"
# No request is refused across a restart. One that a process took from the backlog
# within a millisecond of its SIGTERM is, in about one restart in ten here, reset instead
# of answered (a process SIGTERMed 15 ms after READY=1); the cause is not found yet.
# Anything beyond that one is a regression.
MAX_CUT: Final = 1

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(why_unavailable() is not None, reason=str(why_unavailable())),
]


def write_config(system: Container, text: str) -> None:
    system.write(ENV_FILE, text, mode=0o640)
    system.run("chgrp", "smap-notify-config", ENV_FILE)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """A booted container with smap-notify deployed and a Redis of its own."""
    with contextlib.ExitStack() as stack:
        try:
            container = stack.enter_context(
                booted(tmp_path_factory.mktemp("nspawn"), f"smap-notify-{os.getpid()}")
            )
        except Unavailable as exc:
            pytest.skip(str(exc))
        # The README's steps, from a copy of this repository: a clone under the host's
        # /tmp is not visible there. pip runs in the container's files with the host's
        # network.
        container.copy_in(REPO, SOURCE)
        container.run(
            "bash",
            f"{SOURCE}/requirements/install",
            VENV,
            env={"PYTHON": "/usr/bin/python3", "HOME": "/root"},
            enter="mount",
            timeout=600,
        )
        container.run("groupadd", "--system", "smap-notify-config")
        container.run("install", "-d", "-m", "0755", "/etc/smap-notify")
        write_config(container, GOOD_CONFIG)
        container.run(f"{VENV}/bin/smap-notify", "--config", ENV_FILE, "--check-config")
        units = [f"{SOURCE}/systemd/{n}" for n in (SERVICE, "smap-notify.socket")]
        container.run("install", "-m", "0644", *units, "/etc/systemd/system/")
        container.run(
            "systemd-run", "--unit=test-redis", "redis-server", "--port", str(REDIS_PORT),
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        )  # fmt: skip
        container.systemctl("daemon-reload")
        container.systemctl("enable", "--now", "smap-notify.socket", SERVICE)
        wait_until(lambda: health(container)[0] == 200, "smap-notify healthy")
        yield container


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def probe(system: Container, *args: str, timeout: float = 60) -> str:
    return system.run(sys.executable, NETPROBE, *args, enter="net", timeout=timeout).stdout


def health(system: Container) -> tuple[int, dict[str, object]]:
    result = system.run(sys.executable, NETPROBE, "health", str(PORT), enter="net", check=False)
    if result.returncode != 0:
        return 0, {}
    status, _, body = result.stdout.partition(" ")
    return int(status), json.loads(body)


def show(system: Container, prop: str, unit: str = SERVICE) -> str:
    return system.systemctl("show", "-p", prop, "--value", unit).stdout.strip()


def main_pid(system: Container) -> int:
    return int(show(system, "MainPID"))


def test_deployed_as_the_readme_says_it_delivers_a_published_message(system: Container) -> None:
    token = make_token("u-boot")
    reader = subprocess.Popen(
        ["nsenter", "-t", str(system.leader), "-n", sys.executable, NETPROBE, "receive",
         str(PORT), token, DEV_ORIGIN, "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "open"
        message = json.dumps({"type": "notification", "payload": {"n": 1}})
        system.run("redis-cli", "-p", str(REDIS_PORT), "PUBLISH", "user_noti:u-boot", message)
        frame = json.loads(reader.stdout.readline())
    finally:
        reader.kill()
        reader.wait()
    assert frame["type"] == "notification"
    assert frame["payload"] == {"n": 1}
    # STATUS= follows within a second of a change.
    wait_until(lambda: show(system, "StatusText").startswith("subscribed;"), "STATUS= subscribed")


def test_a_bad_file_fails_the_reload_and_the_daemon_keeps_serving(system: Container) -> None:
    pid = main_pid(system)
    write_config(system, GOOD_CONFIG + "WS_PORT=eighty\n")
    try:
        reload = system.systemctl("reload", SERVICE, check=False)
        assert reload.returncode != 0, reload.stdout + reload.stderr
        assert main_pid(system) == pid
        assert show(system, "ActiveState") == "active"
        assert health(system)[0] == 200
        assert "WS_PORT" in system.journal(SERVICE)
    finally:
        write_config(system, GOOD_CONFIG + "LOGGER_LEVEL=debug\n")
    assert system.systemctl("reload", SERVICE, check=False).returncode == 0
    wait_until(
        lambda: "configuration reloaded changed=LOGGER_LEVEL" in system.journal(SERVICE),
        "the good file applied",
    )
    assert main_pid(system) == pid


def hammering(system: Container, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["nsenter", "-t", str(system.leader), "-n", sys.executable, NETPROBE, "hammer",
         str(PORT), str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_restarts_while_clients_connect_refuse_nothing(system: Container) -> None:
    hammer = hammering(system, 6)
    for _ in range(3):
        pid = main_pid(system)
        system.systemctl("restart", SERVICE)
        assert main_pid(system) != pid
    counts = json.loads(hammer.communicate(timeout=60)[0])
    assert counts["refused"] == 0, counts
    assert counts["other"] <= MAX_CUT, json.dumps(counts)
    assert counts["answered"] > 0, counts


def test_stop_and_activate_cycles_and_crashes_stay_within_the_start_limit(
    system: Container,
) -> None:
    """Five stop/activate cycles in a few seconds hit systemd's default limit, after which
    the socket failed and the port refused every connection until reset-failed."""
    for _ in range(8):
        system.systemctl("stop", SERVICE)
        assert health(system)[0] in (200, 503)  # the connection starts the service again
    for _ in range(8):
        pid = main_pid(system)
        system.run("kill", "-9", str(pid))
        wait_until(lambda pid=pid: main_pid(system) not in (0, pid), "restarted after SIGKILL")
    wait_until(lambda: health(system)[0] == 200, "healthy after the crashes")
    assert show(system, "ActiveState", "smap-notify.socket") == "active"
    assert show(system, "ActiveState") == "active"


def test_the_watchdog_restarts_a_stopped_daemon(system: Container) -> None:
    dropin = "/etc/systemd/system/smap-notify.service.d/watchdog.conf"
    system.write(dropin, "[Service]\nWatchdogSec=3s\n")
    system.systemctl("daemon-reload")
    system.systemctl("restart", SERVICE)
    try:
        wait_until(lambda: health(system)[0] == 200, "healthy with WatchdogSec=3s")
        pid = main_pid(system)
        system.run("kill", "-STOP", str(pid))
        wait_until(lambda: main_pid(system) not in (0, pid), "restarted by the watchdog")
        assert "Watchdog timeout" in system.journal(SERVICE)
        wait_until(lambda: health(system)[0] == 200, "healthy after the watchdog's restart")
    finally:
        system.run("rm", "-f", dropin)
        system.systemctl("daemon-reload")
        system.systemctl("restart", SERVICE)


# -- several instances on one port: the template units -------------------------------------


def admin_health(system: Container, instance: int) -> tuple[int, dict[str, object]]:
    result = system.run(
        sys.executable, NETPROBE, "health", str(9100 + instance), enter="net", check=False
    )
    if result.returncode != 0:
        return 0, {}
    status, _, body = result.stdout.partition(" ")
    return int(status), json.loads(body)


@pytest.fixture(scope="module")
def instances(system: Container) -> Container:
    """smap-notify@1 and @2 on port 8081 in place of the single service."""
    system.systemctl("disable", "--now", "smap-notify.socket", SERVICE)
    units = [f"{SOURCE}/systemd/{n}" for n in ("smap-notify@.service", "smap-notify@.socket")]
    system.run("install", "-m", "0644", *units, "/etc/systemd/system/")
    system.systemctl("daemon-reload")
    system.systemctl(
        "enable", "--now", "smap-notify@1.socket", "smap-notify@2.socket",
        "smap-notify@1.service", "smap-notify@2.service",
    )  # fmt: skip
    for n in (1, 2):
        wait_until(lambda n=n: admin_health(system, n)[0] == 200, f"instance {n} healthy")
    return system


def connections_of(system: Container, instance: int) -> int:
    websocket = admin_health(system, instance)[1]["websocket"]
    assert isinstance(websocket, dict)
    return int(websocket["active_connections"])


def test_two_template_instances_share_the_port_and_each_serves(instances: Container) -> None:
    token = make_token("u-two")
    readers = [
        subprocess.Popen(
            [
                "nsenter",
                "-t",
                str(instances.leader),
                "-n",
                sys.executable,
                NETPROBE,
                "receive",
                str(PORT),
                token,
                DEV_ORIGIN,
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(16)
    ]
    try:
        for reader in readers:
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "open"
        counts = [connections_of(instances, 1), connections_of(instances, 2)]
        assert sum(counts) == 16 and min(counts) > 0, counts
        message = json.dumps({"type": "notification", "payload": "both"})
        published = instances.run(
            "redis-cli", "-p", str(REDIS_PORT), "PUBLISH", "user_noti:u-two", message
        )
        assert published.stdout.strip() == "2"  # each instance subscribed once
        for reader in readers:
            assert reader.stdout is not None
            assert json.loads(reader.stdout.readline())["payload"] == "both"
    finally:
        for reader in readers:
            reader.kill()
            reader.wait()
    for n in (1, 2):
        wait_until(
            lambda n=n: show(instances, "StatusText", f"smap-notify@{n}.service").startswith(
                "subscribed;"
            ),
            f"instance {n} STATUS=",
        )


def test_restarting_one_instance_refuses_nothing(instances: Container) -> None:
    hammer = hammering(instances, 5)
    for _ in range(2):
        pid = main_pid_of(instances, 1)
        instances.systemctl("restart", "smap-notify@1.service")
        assert main_pid_of(instances, 1) != pid
    counts = json.loads(hammer.communicate(timeout=60)[0])
    assert counts["refused"] == 0, json.dumps(counts)
    assert counts["other"] <= MAX_CUT, json.dumps(counts)
    assert counts["answered"] > 0


def main_pid_of(system: Container, instance: int) -> int:
    return int(show(system, "MainPID", f"smap-notify@{instance}.service"))


def test_reload_and_watchdog_act_on_one_instance(instances: Container) -> None:
    first, second = main_pid_of(instances, 1), main_pid_of(instances, 2)
    write_config(instances, GOOD_CONFIG + "WS_PORT=eighty\n")
    try:
        assert instances.systemctl("reload", "smap-notify@1.service", check=False).returncode
    finally:
        write_config(instances, GOOD_CONFIG + "WS_PING_INTERVAL=25s\n")
    assert instances.systemctl("reload", "smap-notify@1.service", check=False).returncode == 0

    def reloaded(instance: int) -> bool:
        journal = instances.journal(f"smap-notify@{instance}.service")
        return re.search(r"configuration reloaded changed=\S*WS_PING_INTERVAL", journal) is not None

    wait_until(lambda: reloaded(1), "instance 1 reloaded")
    assert not reloaded(2)
    assert (main_pid_of(instances, 1), main_pid_of(instances, 2)) == (first, second)

    dropin = "/etc/systemd/system/smap-notify@2.service.d/watchdog.conf"
    instances.write(dropin, "[Service]\nWatchdogSec=3s\n")
    instances.systemctl("daemon-reload")
    instances.systemctl("restart", "smap-notify@2.service")
    try:
        wait_until(lambda: admin_health(instances, 2)[0] == 200, "instance 2 healthy")
        second = main_pid_of(instances, 2)
        instances.run("kill", "-STOP", str(second))
        wait_until(lambda: main_pid_of(instances, 2) not in (0, second), "instance 2 restarted")
        assert main_pid_of(instances, 1) == first
        wait_until(lambda: admin_health(instances, 2)[0] == 200, "instance 2 healthy again")
    finally:
        instances.run("rm", "-f", dropin)
        instances.systemctl("daemon-reload")
