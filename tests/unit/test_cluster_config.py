"""cluster.* settings and the parts of the Ray backend that need no cluster: bad
combinations refused with the fix, a missing Ray or a cluster that does not answer said in
one line before anything starts, the split of requests over engines. The cluster itself is
tested in tests/system/test_cluster.py (its own group)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from herl.generation.ray_engines import split_points
from schemas.config import ConfigError, load_config
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("extra, words", [
    ({"train.launcher.num_machines": 2, "train.launcher.main_process_ip": "10.0.0.1"}, "num_machines at 1"),
    ({"train.between_iterations": "exit"}, "use auto, keep or offload"),
    ({"cluster.engines": 0}, "cluster.engines must be >= 1"),
    ({"cluster.trainer_cpus": 0}, "trainer_cpus and engine_cpus must be > 0"),
])
def test_bad_cluster_settings_are_refused_with_the_fix(extra, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, {"cluster.backend": "ray", **extra})


def test_the_cluster_section_changes_no_stage_hash():
    """Where the work runs is not what it computes: moving a run to a cluster redoes nothing."""
    from schemas.config import STAGE_CONFIG, stage_config_hash

    local, ray = load_config(None, {}), load_config(None, {"cluster.backend": "ray", "cluster.engines": 4})
    assert all(stage_config_hash(local, s) == stage_config_hash(ray, s) for s in STAGE_CONFIG)


def _herl_run(tmp_path: Path, *sets: str, hide_ray: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if hide_ray:  # every process of the command (its worker too) finds no Ray
        (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    cmd = [sys.executable, "-m", "herl.commands.cli", "run", "--runs-dir", str(tmp_path / "runs"), "--run-id", "r",
           "--set", 'cluster.backend="ray"', *[x for s in sets for x in ("--set", s)]]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_ray_missing_is_one_line_before_anything_starts(tmp_path):
    res = _herl_run(tmp_path, hide_ray=True)
    assert res.returncode != 0
    lines = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()]
    assert lines == ["herl run: cluster.backend = ray needs Ray, which is not installed here: pip install 'herl[ray]'"], lines
    assert not (tmp_path / "runs").exists()  # no run folder, and Prefect was never started (nothing else said)


def test_a_cluster_that_does_not_answer_is_one_line_before_anything_starts(tmp_path):
    pytest.importorskip("ray")
    port = free_port()
    res = _herl_run(tmp_path, f'cluster.address="127.0.0.1:{port}"')
    assert res.returncode != 0
    lines = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()]
    # (Ray names the local node by its interface address)
    assert len(lines) == 1 and "no Ray cluster answers at" in lines[0] and f":{port} " in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_requests_are_split_only_where_a_one_engine_batch_ends():
    # transformers (align = batch size 8): 6 requests of 4 sequences; batches end after requests 2, 4
    assert split_points([4] * 6, 2, 8) == [(0, 2), (2, 6)]  # 8 or 16 of 24 sequences: the first of equals
    for sizes, parts, align in [([4] * 6, 2, 8), ([4] * 7, 3, 8), ([3, 5, 4, 4, 2, 6], 2, 8), ([1] * 10, 4, 1)]:
        spans = split_points(sizes, parts, align)
        assert spans[0][0] == 0 and spans[-1][1] == len(sizes) and len(spans) <= parts
        assert all(a < b for a, b in spans) and all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
        assert all(sum(sizes[:a]) % align == 0 for a, _ in spans)  # every cut at a batch boundary
    assert split_points([1] * 10, 4, 1) == [(0, 2), (2, 5), (5, 7), (7, 10)]  # vLLM: any request boundary, even
    assert split_points([3, 3], 2, 8) == [(0, 2)]  # no boundary on a batch edge: one engine takes all
    assert split_points([4], 3, 1) == [(0, 1)]
