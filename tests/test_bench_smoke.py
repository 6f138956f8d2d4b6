"""Smoke test of scripts/bench.py: the quick run completes and reports every default case.

Behaviour only, never wall-clock: timings on a shared CI machine mean nothing, so this checks
that each case ran, that both implementations agree on the loss, that the reference refuses
more than 2**24 rows, that the DDP case counted at most two collectives per forward and
none in backward, that peak extra memory stays within 2x the pooled scores on both
threshold paths (a size-independent ratio, measured in a fresh process), and that a fresh
process filling a 16k-row queue at C=1000 grows by at most 2x the pooled scores. The traffic
case (not a default case) runs on its own: the gathered mode's bytes grow with the world, the
batch and C, the sharded mode's (once this checkout has it) do not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "scripts", "bench.py")
CASES = (
    "c16_q64k",
    "c100_q64k",
    "c100_q64k_q03",
    "c10k_q16k",
    "c1000_q16k_rss",
    "c1_1m",
    "c1_20m",
    "ddp_gloo_2",
)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, BENCH, "--quick", "--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"bench.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "| case |" in proc.stdout  # the table was printed
    results = json.loads(out.read_text())
    results["stdout"] = proc.stdout
    return results


def test_reports_every_case_and_the_machine(quick_results):
    assert set(CASES) <= set(quick_results["cases"])
    machine = quick_results["machine"]
    assert machine["torch_threads"] == 1 and machine["torch"] and machine["cpu_model"]
    for name in CASES:
        case = quick_results["cases"][name]
        assert "error" not in case, (name, case.get("error"))
        assert case["ours_median_ms"] > 0 and case["target"]


def test_speed_cases_time_both_sides_and_agree(quick_results):
    for name in ("c16_q64k", "c100_q64k", "c1_1m"):
        case = quick_results["cases"][name]
        assert case["reference_median_ms"] > 0 and case["speedup"] > 0
        assert len(case["ours_ms"]) >= 1 and len(case["reference_ms"]) >= 1
        assert case["loss_abs_diff"] <= 1e-5, (name, case["loss_ours"], case["loss_reference"])


def test_large_case_runs_and_reference_refuses_it(quick_results):
    case = quick_results["cases"]["c1_20m"]
    assert case["reference_raises"] and case["reference_rows"] > 2**24
    assert "too large" in case["reference_error"]
    assert case["peak_extra_mb"] and case["logits_mb"] > 0
    assert case["method"]


def test_ddp_collectives_per_forward(quick_results):
    case = quick_results["cases"]["ddp_gloo_2"]
    assert case["collectives_per_forward_steady_max"] <= 2
    assert case["collectives_per_backward_steady_max"] == 0
    assert case["loss_identical_on_ranks"]
    assert case["met"]


def test_peak_memory_within_twice_the_pool_on_both_threshold_paths(quick_results):
    for name, quantile in (("c100_q64k", 0.005), ("c100_q64k_q03", 0.3), ("c10k_q16k", 0.3)):
        case = quick_results["cases"][name]
        assert case["quantile"] == quantile
        assert case["pool_mb"] > 5, "pool too small for the ratio to mean anything"
        assert case["peak_extra_over_pool"] <= 2.0, (name, case["peak_extra_mb"], case["pool_mb"])


def test_resident_memory_of_a_fresh_process_within_twice_the_pool_queue_included(quick_results):
    # Default malloc, the queue filled by training steps and one more step: what a user sees.
    case = quick_results["cases"]["c1000_q16k_rss"]
    assert (case["num_classes"], case["queue"], case["quantile"]) == (1000, 16384, 0.3)
    assert case["queue_full_mb"] > 0, "the queue filled during the run"
    assert case["peak_growth_mb"] >= case["queue_mb"], "the queue itself must be counted"
    assert case["peak_growth_over_pool"] <= 2.0, (case["peak_growth_mb"], case["pool_mb"])


def test_quick_run_judges_only_size_independent_targets(quick_results):
    # Speed targets are set for the full sizes: --quick must neither fail nor pass them.
    out = quick_results["stdout"]
    assert "targets missed" not in out and "NO" not in out.split("| case |", 1)[1]
    assert "all size-independent targets met" in out
    assert quick_results["cases"]["c1_1m"]["met"] is None  # a speed target only
    # c16_q64k: its host-sync target holds at any size and is judged; its speed target is not.
    c16 = quick_results["cases"]["c16_q64k"]
    assert c16["met"] is True and c16["not_judged"] == "speed: n/a at --quick sizes"
    assert c16["host_syncs_per_forward"] and c16["host_syncs_per_backward"] == {}
    assert "§" not in out


@pytest.fixture(scope="module")
def quick_traffic(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "traffic.json"
    proc = subprocess.run(
        [sys.executable, BENCH, "--quick", "--cases", "ddp_traffic", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"bench.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    case = json.loads(out.read_text())["cases"]["ddp_traffic"]
    case["stdout"] = proc.stdout
    return case


def _sharded_in_this_checkout() -> bool:
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    return bench.sharded_available("recall")


def test_traffic_case_counts_every_configuration_the_same_on_every_rank_and_step(quick_traffic):
    rows = quick_traffic["rows"]
    modes = [False, True] if _sharded_in_this_checkout() else [False]
    grid = {(r["loss"], r["num_classes"], r["world_size"], r["batch"], r["sharded"]) for r in rows}
    expected = {
        ("recall", c, w, n, sharded)
        for c in quick_traffic["classes"]["recall"]
        for w in quick_traffic["worlds"]
        for n in quick_traffic["batches"]
        for sharded in modes
    }
    assert expected <= grid and len(quick_traffic["worlds"]) >= 3
    for r in rows:
        assert r["bytes_same_every_rank_and_step"] and r["loss_same_on_every_rank"], r
        assert r["median_step_ms"] > 0
        if r["world_size"] == 1:  # alone: nothing to exchange in either mode
            assert r["bytes_per_step"] == 0, r


def _recall_rows(case: dict, sharded: bool) -> dict:
    return {
        (r["num_classes"], r["world_size"], r["batch"]): r
        for r in case["rows"]
        if r["loss"] == "recall" and r["sharded"] == sharded
    }


def test_gathered_traffic_grows_with_world_and_batch_and_classes(quick_traffic):
    # Judged from the raw counts here, not from the bench's own verdict.
    at = _recall_rows(quick_traffic, sharded=False)
    worlds = [w for w in quick_traffic["worlds"] if w > 1]
    per_row = {}
    for c in quick_traffic["classes"]["recall"]:
        for w in worlds:
            for n in quick_traffic["batches"]:
                forward = at[c, w, n]["forward"]
                # at least the C float32 scores of every rank's every row; nothing in backward
                assert forward["rows"] >= w * n * c * 4, (c, w, n, forward)
                assert at[c, w, n]["bytes_backward"] == 0
                per_row.setdefault(c, set()).add(forward["rows"] / (w * n))
    assert all(len(values) == 1 for values in per_row.values()), per_row  # rows = W*N*width
    assert min(per_row[100]) > min(per_row[3])
    for v in quick_traffic["verdicts"]:
        assert v["gathered_grows_as_w_n"], v


def test_sharded_recall_traffic_is_flat_in_batch_and_world(quick_traffic):
    if not _sharded_in_this_checkout():
        for v in quick_traffic["verdicts"]:
            assert v["sharded_ok"] is None  # reported as not measured, not as met
        assert "gathered only" in quick_traffic["stdout"]
        return
    at = _recall_rows(quick_traffic, sharded=True)
    gathered = _recall_rows(quick_traffic, sharded=False)
    worlds = [w for w in quick_traffic["worlds"] if w > 1]
    for c in quick_traffic["classes"]["recall"]:
        statistics = {
            at[c, w, n]["bytes_per_step"] - at[c, w, n]["metadata_bytes"]
            for w in worlds
            for n in quick_traffic["batches"]
        }
        assert len(statistics) == 1 and statistics.pop() > 0, (c, statistics)
        assert all(
            at[c, w, n]["forward"]["rows"] == 0 for w in worlds for n in quick_traffic["batches"]
        )
        w, n = max(worlds), max(quick_traffic["batches"])
        assert at[c, w, n]["bytes_per_step"] < gathered[c, w, n]["bytes_per_step"], (c, w, n)
    assert all(v["sharded_ok"] for v in quick_traffic["verdicts"])
    assert quick_traffic["met"] is True


def test_projection_marks_every_figure_and_extends_the_measured_model(quick_traffic):
    rows = [line for line in quick_traffic["stdout"].splitlines() if "projected (" in line]
    assert rows and all("projected:" in line for line in rows)
    at = _recall_rows(quick_traffic, sharded=False)
    small, large = quick_traffic["batches"]
    w = max(quick_traffic["worlds"])
    for p in quick_traffic["projection"]:
        if p["loss"] != "recall":
            continue
        c = p["num_classes"]
        row_bytes = at[c, w, large]["forward"]["rows"] / (w * large)
        metadata = at[c, w, large]["metadata_bytes"] / w
        expected = (row_bytes * p["batch"] + metadata) * p["world_size"]
        assert abs(p["gathered_bytes"] - expected) <= 1e-9 * expected, (p, expected)


def test_sharded_smooth_ap_traffic_follows_the_global_positives(quick_traffic):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    spec = bench.TRAFFIC_LOSSES["smooth_ap"]
    assert ("smooth_ap" in quick_traffic["losses"]) == spec.sharded_available()
    if not spec.sharded_available():
        return  # measured once this checkout's Smooth-AP has a sharded mode
    rows = {
        (r["world_size"], r["batch"], r["sharded"]): r
        for r in quick_traffic["rows"]
        if r["loss"] == "smooth_ap"
    }
    per_positive = set()
    for w in (w for w in quick_traffic["worlds"] if w > 1):
        for n in quick_traffic["batches"]:
            sharded, gathered = rows[w, n, True], rows[w, n, False]
            assert (
                sharded["forward"]["rows"] == 0
                or sharded["forward"]["rows"] < gathered["forward"]["rows"]
            )
            statistics = sharded["bytes_per_step"] - sharded["metadata_bytes"]
            per_positive.add(statistics / (w * spec.positives(n)))
    assert len(per_positive) == 1 and per_positive.pop() > 0, per_positive
    w, n = max(quick_traffic["worlds"]), max(quick_traffic["batches"])
    assert rows[w, n, True]["bytes_per_step"] < rows[w, n, False]["bytes_per_step"]


@pytest.mark.parametrize("name", ["pauc_pair_1m", "pauc_trap_1m"])
def test_pauc_cases_time_ours_beside_the_plain_reference_and_measure_our_memory(name, monkeypatch):
    """The PAUC cases at --quick sizes, their children run in this process (the fresh-process
    memory figures are for scripts/bench.py): both sides timed, same loss, rows rendered."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(bench, "run_child", lambda f, *a, **_: getattr(bench, f)(*a))
    case = bench.CASES[name]
    args = bench.parse_args(["--quick", "--cases", name])
    result = bench.run_pauc_case(case, args)
    assert "error" not in result, result.get("error")
    assert result["surrogate"] == ("pairwise" if "pair" in name else "trapezoid")
    assert result["losses_agree"], (result["speed"]["loss_ours"], result["speed"]["loss_plain"])
    assert result["speed"]["ours_ms"] and result["speed"]["plain_ms"] and result["speedup"] > 0
    assert result["memory"]["rows"] == case.quick[0] and result["memory"]["peak_extra_mb"]
    assert result["met"] in (True, False) and "peak extra" in result["target"]
    rows = bench.table_rows({name: result})
    assert len(rows) == 2 and all(len(row) == 6 for row in rows)
