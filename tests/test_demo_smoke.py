"""Smoke test of the main demo, scripts/train_alerts.py: a tiny run end to end.

Runs the script in a subprocess (single process, CPU) with a few epochs on a small
synthetic task and checks that it prints the launch line and the results table,
writes a well-formed JSON report and a non-empty PNG, and that the arm trained through
LossWarmupWrapper gives exactly the numbers of the hand-written schedule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_alerts.py"

ARMS = ("bce", "raq", "sap", "pauc", "raq_wrapped")
TINY = [
    "--n-samples",
    "20000",
    "--epochs",
    "3",
    "--warmup-epochs",
    "1",
    "--batch-size",
    "1024",
    "--queue-size",
    "2048",
    "--no-progress",
]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MPLBACKEND"] = "Agg"
    for var in (
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        env.pop(var, None)  # never inherit a launcher's rendezvous
    return env


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_demo_writes_json_png_and_table(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    proc = _run([*TINY, "--seeds", "0", "1", "--out", str(out)])
    assert "world_size=1 backend=none" in proc.stdout
    assert "mean ± std" in proc.stdout and "BCE alone" in proc.stdout
    assert "Smooth-AP" in proc.stdout and "LossWarmupWrapper" in proc.stdout
    assert "PAUC@budget" in proc.stdout

    report = json.loads((out / "train_alerts.json").read_text())
    assert report["world_size"] == 1
    assert [s["seed"] for s in report["seeds"]] == [0, 1]
    for seed in report["seeds"]:
        for arm in ARMS:
            hist = seed["arms"][arm]["history"]
            assert hist["epoch"] == [1, 2, 3]
            assert 0.0 <= seed["arms"][arm]["test_recall"] <= 1.0
            assert seed["arms"][arm]["test_recall"] == hist["test_recall"][-1]
        # the ranking arms fork from the BCE arm after the warm-up: shared first epoch
        for arm in ARMS[1:]:
            assert (
                seed["arms"][arm]["history"]["test_recall"][0]
                == seed["arms"]["bce"]["history"]["test_recall"][0]
            )
        # LossWarmupWrapper reproduces the hand-written schedule bit for bit: every epoch's
        # training loss and recall.
        assert seed["arms"]["raq_wrapped"]["history"] == seed["arms"]["raq"]["history"]
    for arm in ARMS:
        values = [s["arms"][arm]["test_recall"] for s in report["seeds"]]
        assert report["summary"][arm]["mean"] == pytest.approx(sum(values) / len(values))
        assert report["summary"][arm]["n"] == 2

    png = out / "train_alerts.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pauc_arm_starts_from_the_bce_warm_up_weights(tmp_path: Path) -> None:
    """With Adam's lr at 0 the PAUC arm keeps the weights it forked from, so every epoch after
    the warm-up must score the test split exactly as the BCE arm did at the end of it (the
    copied warm-up history alone would not show a fork from fresh weights)."""
    out = tmp_path / "out"
    _run(
        [*TINY, "--seeds", "0", "--arms", "pauc", "--pauc-lr", "0", "--no-plot", "--out", str(out)]
    )
    arms = json.loads((out / "train_alerts.json").read_text())["seeds"][0]["arms"]
    assert sorted(arms) == ["bce", "pauc"]
    warm = arms["bce"]["history"]["test_recall"][0]  # --warmup-epochs 1
    assert arms["pauc"]["history"]["test_recall"] == [warm, warm, warm]
    assert (
        arms["pauc"]["history"]["val_recall"][1:] == [arms["bce"]["history"]["val_recall"][0]] * 2
    )


def test_pauc_arm_trains_with_either_surrogate(tmp_path: Path) -> None:
    """Both surrogates run through the demo, and ``--pauc-surrogate`` really reaches the loss:
    the two give different trainings, each different from BCE alone."""
    histories = {}
    for surrogate in ("trapezoid", "pairwise"):
        out = tmp_path / surrogate
        proc = _run(
            [*TINY, "--seeds", "0", "--arms", "pauc", "--pauc-surrogate", surrogate]
            + ["--no-plot", "--out", str(out)]
        )
        assert "pauc better than bce on" in proc.stdout
        report = json.loads((out / "train_alerts.json").read_text())
        assert report["config"]["pauc_surrogate"] == surrogate
        hist = report["seeds"][0]["arms"]["pauc"]["history"]
        bce = report["seeds"][0]["arms"]["bce"]["history"]
        assert hist["epoch"] == [1, 2, 3]
        # After the warm-up the loss is (1 - pAUC) + BCE: finite, and not BCE's training.
        assert all(0.0 < v < 10.0 for v in hist["train_loss"][1:])
        assert hist["train_loss"][1:] != bce["train_loss"][1:]
        histories[surrogate] = hist["train_loss"][1:]
    assert histories["trapezoid"] != histories["pairwise"]


def test_pauc_band_options_are_checked(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--pauc-alpha", "0.02", "--out", str(tmp_path)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "--pauc-alpha" in proc.stderr and "alpha=0.02, beta=0.01" in proc.stderr


def test_demo_reads_user_csv(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    n = 6000
    y = (rng.random(n) < 0.01).astype(int)
    x = rng.standard_normal((n, 3)) + y[:, None] * np.array([2.0, 0.0, 1.0])
    csv = tmp_path / "alerts.csv"
    lines = ["a,b,c,kind,is_alert"] + [
        f"{x[i, 0]:.5f},{x[i, 1]:.5f},{x[i, 2]:.5f},t{i % 3},{y[i]}" for i in range(n)
    ]
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out_csv"
    proc = _run(
        [
            "--data",
            str(csv),
            "--label-column",
            "is_alert",
            "--epochs",
            "2",
            "--warmup-epochs",
            "1",
            "--batch-size",
            "512",
            "--quantile",
            "0.03",
            "--queue-size",
            "1024",
            "--no-progress",
            "--no-plot",
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "train_alerts.json").read_text())
    assert report["seeds"][0]["source"] == str(csv)
    assert "ignoring non-numeric columns: ['kind']" in proc.stderr


def test_demo_rejects_missing_label_column(tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("a,b\n1,0\n2,1\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--data",
            str(csv),
            "--label-column",
            "nope",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "--label-column" in proc.stderr and "'nope'" in proc.stderr
