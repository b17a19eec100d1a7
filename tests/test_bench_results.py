"""bench/run.py's bookkeeping of RESULTS.rst and of the scale scenario: pure helpers, no
benchmark run, no timing."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/run.py with its folder (RESULTS.rst, profile-notes.rst) in ``tmp_path``."""
    # Not syspath_prepend: it calls pkg_resources, which another test's plugin may have
    # replaced by a module without it.
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])
    monkeypatch.delitem(sys.modules, "run", raising=False)
    import run as module

    monkeypatch.setattr(module, "BENCH", tmp_path)
    (tmp_path / "profile-notes.rst").write_text("Profile notes\n=============\n\nnotes\n")
    return module


MAIN_TABLE = """Benchmark results
=================

==========  ===========================  ===========  ================  =====
scenario    figure (median)              smap-notify  asyncio-baseline  ratio
==========  ===========================  ===========  ================  =====
idle        server CPU per connect (µs)  549          460               1.19
throughput  server CPU per message (µs)  16.0         40.9              0.39
==========  ===========================  ===========  ================  =====

"""


def test_a_section_is_inserted_before_the_profile_notes_then_replaced_alone(
    run: ModuleType,
) -> None:
    results = run.BENCH / "RESULTS.rst"
    notes = (run.BENCH / "profile-notes.rst").read_text()
    results.write_text(MAIN_TABLE + notes)
    idle = f"{run.SECTION_START}\n\nidle v1\n\n{run.SECTION_END}"
    run.put_section(idle, run.SECTION_START, run.SECTION_END)
    scale = f"{run.SCALE_START}\n\nscale v1\n\n{run.SCALE_END}"
    run.put_section(scale, run.SCALE_START, run.SCALE_END)
    text = results.read_text()
    assert text.index(MAIN_TABLE) < text.index("idle v1") < text.index("scale v1")
    assert text.index("scale v1") < text.index("Profile notes")

    run.put_section(scale.replace("v1", "v2"), run.SCALE_START, run.SCALE_END)
    text = results.read_text()
    assert "scale v2" in text and "scale v1" not in text
    assert "idle v1" in text
    assert text.count(run.SCALE_START) == 1 and text.count(run.SECTION_START) == 1
    assert run.kept_section(run.SCALE_START, run.SCALE_END) == scale.replace("v1", "v2")


def test_the_previous_figure_is_smap_notifys_column_of_the_main_table(run: ModuleType) -> None:
    # A figure of the same name inside a later section is not the main table's.
    later = f"{run.SECTION_START}\nthroughput  server CPU per message (µs)  99.0\n"
    (run.BENCH / "RESULTS.rst").write_text(MAIN_TABLE + later + run.SECTION_END + "\n")
    assert run.previous_figure("throughput", "server CPU per message (µs)") == 16.0
    assert run.previous_figure("idle", "server CPU per connect (µs)") == 549.0
    assert run.previous_figure("fanout", "server CPU per frame (µs)") is None


def test_one_repeat_puts_both_modes_side_by_side_and_the_baselines_beside_one_instance(
    run: ModuleType,
) -> None:
    order = run.scale_runs([run.BASE, run.NODE])
    assert order[:4] == [
        (run.SMAP, "pattern", 1),
        (run.SMAP, "user", 1),
        (run.BASE, run.OWN, 1),
        (run.NODE, run.OWN, 1),
    ]
    assert order[4:] == [
        (run.SMAP, mode, width) for width in (2, 4) for mode in ("pattern", "user")
    ]
    against = run.scale_runs([], "abc123")
    assert against[:3] == [
        (run.SMAP, "pattern", 1),
        (run.SMAP, "user", 1),
        (f"{run.SMAP}@abc123", "pattern", 1),
    ]


def scale_run(server: str, mode: str, width: int, us: float, **more: object) -> dict:
    return {
        "scenario": "scale",
        "server": server,
        "mode": mode,
        "width": width,
        "correct": True,
        "server_cpu_us_per_msg": us,
        "conns_per_instance": [1000 // width] * width,
        "connect": {"conns": 1000, "cpu_us_per_connect": 500.0, "p50_ms": 30.0, "p99_ms": 50.0},
        **more,
    }


def test_the_targets_compare_w4_with_w1_and_the_connect_costs_of_the_two_modes(
    run: ModuleType,
) -> None:
    (run.BENCH / "RESULTS.rst").write_text(MAIN_TABLE)
    seq = {"conns": 1000, "cpu_us_per_connect": 500.0, "p50_ms": 0.5, "p99_ms": 3.0}
    slower = {**seq, "cpu_us_per_connect": 700.0, "p99_ms": 3.5}
    results = [
        scale_run(run.SMAP, "pattern", 1, 16.0, sequential=seq),
        scale_run(run.SMAP, "pattern", 1, 17.0, sequential=seq),
        scale_run(run.SMAP, "user", 1, 10.0, sequential=slower),
        scale_run(run.SMAP, "pattern", 4, 40.0),
        scale_run(run.SMAP, "user", 4, 13.0),
        scale_run(f"{run.SMAP}@abc123", "pattern", 1, 15.0),
        scale_run(f"{run.SMAP}@abc123", "pattern", 1, 15.5),
        {
            "scenario": "resubscribe",
            "server": run.SMAP,
            "mode": "user",
            "width": 1,
            "users": 10000,
            "correct": True,
            "connections": 10000,
            "subscribed_s": 0.1,
            "last_resync_s": 2.5,
            "resyncs": 10000,
        },
    ]
    tables, targets = run.scale_tables(results)
    assert len(tables) == 3
    lines = targets.splitlines()
    assert any("user mode" in t and "1.30x, NOT met" in t for t in lines)  # 13 / 10
    assert any("pattern mode" in t and "2.42x, shown" in t for t in lines)  # 40 / 16.5
    assert any("one at a time" in t and "+0.50 ms, met" in t for t in lines)
    assert any("one at a time" in t and "1.40x, NOT met" in t for t in lines)
    assert any("64 at a time" in t and "1.00x, met" in t for t in lines)
    assert any("10,000 users" in t and "2.500 s" in t and "NOT met" in t for t in lines)
    assert any("16.5 against 16.0" in t for t in lines)
    # 16.5 (16.0-17.0) against 15.25 (15.0-15.5): more in every run.
    assert any("@abc123" in t and "1.08x" in t and "a regression" in t for t in lines)
    # The cost table: W=4 against W=1 of the same mode.
    assert "2.42" in tables[0] and "1.30" in tables[0]


def test_the_p99_targets_show_each_repeats_difference_and_pattern_modes_spread(
    run: ModuleType,
) -> None:
    (run.BENCH / "RESULTS.rst").write_text(MAIN_TABLE)
    results = [
        scale_run(run.SMAP, mode, 1, 16.0, connect={"cpu_us_per_connect": 500.0, "p99_ms": p99})
        for mode, p99 in (("pattern", 50.0), ("user", 52.0), ("pattern", 60.0), ("user", 59.0))
    ]
    _, targets = run.scale_tables(results)
    line = next(t for t in targets.splitlines() if "p99 (64 at a time)" in t)
    assert "(by repeat: +2.0, -1.0 ms; pattern mode's own p99 50.0-60.0 ms" in line
