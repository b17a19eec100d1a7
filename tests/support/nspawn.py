"""A real systemd (PID 1) booted with systemd-nspawn over an overlay of this host's root.

The container sees the host's files through the overlay's lower layer; everything it
writes lands in a tmpfs (the upper layer), so nothing of the host changes. It has a
private network: loopback only, so its ports never collide with the host's. Commands run
in it through ``nsenter`` (``Container.run``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT: Final = 60.0
# Units the container must not start: what the host enables (databases, brokers,
# timers) and the consoles, which a container without a terminal cannot serve.
ALWAYS_MASKED: Final = ("console-getty.service", "getty@tty1.service", "systemd-timesyncd.service")
CGROUP_HIERARCHIES: Final = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")


class Unavailable(Exception):
    """This machine cannot boot a container (not root, no nspawn, no hybrid cgroups)."""


def why_unavailable() -> str | None:
    """Why a container cannot boot here, or None when it can be tried."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package systemd-container, util-linux)"
    for hierarchy in CGROUP_HIERARCHIES:
        if not Path(hierarchy, "cgroup.procs").exists():
            return f"no cgroup hierarchy at {hierarchy}"
    if Path("/proc/1/comm").read_text().strip() == "systemd":
        return "this host runs systemd as PID 1: boot the units on it instead"
    return None


class Container:
    """A booted container: run commands in it, stop it."""

    def __init__(self, name: str, nspawn: subprocess.Popen[bytes], leader: int, root: Path) -> None:
        self.name = name
        self.nspawn = nspawn
        self.leader = leader  # the container's PID 1, as seen from the host
        self.root = root  # the container's / as mounted on the host

    def copy_in(self, source: Path, dest: str) -> None:
        """Copy the folder ``source`` of the host to ``dest`` in the container. The host's
        files under /tmp are not there (the container has a /tmp of its own)."""
        shutil.copytree(
            source,
            self.root / dest.lstrip("/"),
            ignore=shutil.ignore_patterns(
                ".git", ".venv*", "__pycache__", "*.egg-info", "build", ".*_cache"
            ),
        )

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 120,
        enter: str = "all",
        env: dict[str, str] | None = None,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the container: ``enter`` its namespaces ``all``, only its
        ``net`` (the host's files: a client from the host's venv) or only its ``mount``
        (its files, the host's network: pip reaching the package index)."""
        flag = {"all": "-a", "net": "-n", "mount": "-m"}[enter]
        command_prefix = ["nsenter", "-t", str(self.leader), flag]
        environment = {"PATH": PATH, "LANG": "C.UTF-8", **(env or {})}
        command = [
            *command_prefix,
            "env",
            "-i",
            *(f"{k}={v}" for k, v in environment.items()),
            *argv,
        ]
        result = subprocess.run(
            command,
            capture_output=True,
            timeout=timeout,
            input=input.decode() if input is not None else None,
            text=True,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the container (its upper layer)."""
        self.run(
            "sh",
            "-c",
            f'umask 022; mkdir -p "$(dirname "{path}")"; cat > "{path}"; chmod {mode:o} "{path}"',
            input=text.encode(),
        )

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def wait_for(self, check: str, timeout: float = 30) -> str:
        """Poll shell ``check`` in the container until it exits 0; its output."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.run("sh", "-c", check, check=False)
            if result.returncode == 0:
                return result.stdout
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not within {timeout}s: {check}\n{result.stdout}{result.stderr}"
                )
            time.sleep(0.1)


def _leader(nspawn_pid: int, timeout: float) -> int:
    """The container's PID 1: the nspawn process's child once it runs systemd (before,
    the child is nspawn's own, setting the container up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{nspawn_pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
        time.sleep(0.05)
    raise Unavailable("systemd-nspawn started no systemd")


def _masks() -> list[str]:
    wanted = [p.name for p in Path("/etc/systemd/system").glob("*.wants/*")]
    return sorted({*wanted, *ALWAYS_MASKED})


@contextlib.contextmanager
def booted(tmp: Path, name: str) -> Iterator[Container]:
    """Boot systemd in a container; power it off and undo every mount on exit."""
    if reason := why_unavailable():
        raise Unavailable(reason)
    layers, root = tmp / "layers", tmp / "root"
    layers.mkdir()
    root.mkdir()
    cgroups = [Path(h, f"smap-notify-test-{name}") for h in CGROUP_HIERARCHIES]
    mounted: list[Path] = []
    nspawn: subprocess.Popen[bytes] | None = None
    try:
        # The upper layer cannot be on the lower layer's file system: a tmpfs.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(layers)], check=True)
        mounted.append(layers)
        (layers / "upper").mkdir()
        (layers / "work").mkdir()
        options = f"lowerdir=/,upperdir={layers}/upper,workdir={layers}/work"
        if subprocess.run(
            ["mount", "-t", "overlay", "-o", options, "overlay", str(root)]
        ).returncode:
            raise Unavailable("overlay mount of / failed")
        mounted.append(root)
        system = root / "etc/systemd/system"
        for unit in _masks():
            target = system / unit
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to("/dev/null")
        default = system / "default.target"
        if default.is_symlink() or default.exists():
            default.unlink()
        default.symlink_to("/lib/systemd/system/multi-user.target")
        # No host systemd to register with: nspawn runs in a cgroup of its own.
        for cgroup in cgroups:
            cgroup.mkdir(exist_ok=True)
        enter = "; ".join(f"echo $$ > {c}/cgroup.procs" for c in cgroups)
        nspawn = subprocess.Popen(
            [
                "sh",
                "-c",
                f'{enter}; exec "$@"',
                "sh",
                "systemd-nspawn",
                "-q",
                "-D",
                str(root),
                "-b",
                "--private-network",
                "--register=no",
                "--keep-unit",
                f"--machine={name}",
                "--console=read-only",
            ],
            stdin=subprocess.DEVNULL,
            stdout=open(tmp / "console.log", "wb"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        container = Container(name, nspawn, _leader(nspawn.pid, 10), root)
        # systemctl answers once PID 1 has made its private socket, early in the boot.
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline or nspawn.poll() is not None:
                raise Unavailable(f"the container did not boot ({state!r}); see {tmp}/console.log")
            time.sleep(0.1)
            state = container.run("systemctl", "is-system-running", check=False).stdout.strip()
        yield container
    finally:
        if nspawn is not None:
            _stop(nspawn)
        for mount in reversed(mounted):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        for cgroup in cgroups:
            # The container's systemd made groups below ours: the deepest go first.
            for group in sorted(cgroup.rglob("*/"), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    group.rmdir()
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        # /run is not a tmpfs here: nspawn leaves its folders behind.
        for left in ("propagate", "unix-export"):
            shutil.rmtree(f"/run/systemd/nspawn/{left}/{name}", ignore_errors=True)


def _stop(nspawn: subprocess.Popen[bytes]) -> None:
    """Power the container off; kill its PID 1 (and so all in it) if that does not work."""
    leader = None
    with contextlib.suppress(Exception):
        leader = _leader(nspawn.pid, 1)
    if leader is not None and nspawn.poll() is None:
        subprocess.run(
            ["nsenter", "-t", str(leader), "-a", "systemctl", "poweroff"],
            timeout=10,
            capture_output=True,
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            nspawn.wait(timeout=20)
    if leader is not None:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{leader}/comm").read_text().strip() == "systemd":
                os.kill(leader, 9)  # the end of a PID namespace's init ends all in it
    if nspawn.poll() is None:
        nspawn.kill()
    nspawn.wait(timeout=10)
