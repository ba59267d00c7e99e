"""A tiny benchmark run: the bench drives its own stack and writes a complete report."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import report
from bench.run import Config, Run


@pytest.fixture
def stack_dir() -> Iterator[Path]:
    """A directory the postgres user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="chargeshare-bench-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_tiny_bench_run_measures_every_figure_and_writes_the_report(
    tmp_path: Path, stack_dir: Path
) -> None:
    """Twenty vehicles for a few seconds yield baselines, both replica phases and a report."""
    cfg = Config(
        sizes=(20,),
        speedups={20: 20.0},
        warmup_s=1.0,
        window_s=3.0,
        drain_s=20.0,
        load_connections=2,
        transition_vehicles=10,
        burst_messages=200,
        baseline_s=0.5,
        connection_target=50,
        directory=stack_dir / "stack",
    )
    results = await Run(cfg, say=lambda *_: None).main()

    assert [b["connections"] for b in results["transaction_baseline"]] == [1, 4]
    assert all(b["per_s"] > 0 for b in results["transaction_baseline"])
    (size,) = results["sizes"]
    assert size["bare_subscriber"]["received"] == size["bare_subscriber"]["sent"]
    assert [p["replicas"] for p in size["phases"]] == [1, 2]
    for phase in size["phases"]:
        assert phase["offered_metrics_per_s"] > 0
        assert phase["outbox_depth"]
        assert len(phase["peak_rss_mib"]) == phase["replicas"]
        assert phase["transition_burst"]["vehicles"] == 10
        assert phase["metric_burst"]["stored"] == phase["metric_burst"]["sent"]
    assert results["connections"]["reached"] == 50

    md = report.write(results, tmp_path / "docs", "python -m bench --sizes 20")
    assert (tmp_path / "docs" / report.CHART).stat().st_size > 0
    text = md.read_text()
    assert "## Raw baselines" in text and "÷ bare subscriber" in text
