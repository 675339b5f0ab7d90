"""cluster.backend = "ray" (herl/cluster) on a real two-node Ray cluster on this machine,
CPU only, the tiny model: trainer ranks on two nodes make the update one process makes,
two engines the rollouts one engine makes, a run the tables a local run makes; a killed
trainer rank or engine fails its stage with one line and `herl resume` completes the run
identically; a node that cannot see the run folder is refused by name; nothing is left
on the cluster.

Their own group (`python -m pytest -m cluster -n 0`, as .ci/run does): the test process
moves itself into a network namespace of its own (root; only loopback there), so every
byte of Ray's traffic stays on 127.0.0.1, and at the end stops exactly the processes of
that namespace (its Ray nodes), nothing else on the machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import small_overrides

pytestmark = pytest.mark.cluster
ray = pytest.importorskip("ray", reason="the cluster group needs Ray: pip install 'herl[ray]'")

ROOT = Path(__file__).resolve().parents[2]
PORT = 6390
CLONE_NEWNET = 0x40000000
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def _ns(pid: int | str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _processes_in(kind: str, ns: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if p.pid != os.getpid() and _ns(p.pid, kind) == ns]


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _ray_start(*args: str, prefix: tuple[str, ...] = ()) -> None:
    subprocess.run([*prefix, sys.executable, "-m", "ray.scripts.scripts", "start", "--disable-usage-stats", *args],
                   check=True, env={**os.environ, **RAY_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=120)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes (node_a: the head, node_b), 2 logical CPUs each, inside this process's
    own network namespace; the address the run joins."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace of its own needs root (CI runs as root)")
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
        pytest.fail(f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    import tempfile

    # Ray's session files and its "current cluster" note in a folder of the test's own (short:
    # Ray's sockets live in it), not in the machine's /tmp/ray
    RAY_ENV["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="herl-ray-", dir="/tmp")
    os.environ.update(RAY_ENV)
    mine = _ns("self", "net")
    assert mine is not None
    try:
        _ray_start("--head", f"--port={PORT}", "--num-cpus=2", '--resources={"node_a": 1}', "--include-dashboard=false")
        _ray_start(f"--address=127.0.0.1:{PORT}", "--num-cpus=2", '--resources={"node_b": 1}')
        yield f"127.0.0.1:{PORT}"
    finally:
        from herl.cluster.ray_backend import disconnect

        disconnect()
        _kill_all(_processes_in("net", mine))  # the Ray nodes this test started, and nothing else
        import shutil

        shutil.rmtree(RAY_ENV["RAY_TMPDIR"], ignore_errors=True)


def _ray_overrides(tmp_path: Path, address: str, run_id: str, **extra) -> dict:
    return small_overrides(tmp_path, run_id=run_id, **{
        "cluster.backend": "ray", "cluster.address": address, "cluster.strategy": "STRICT_SPREAD",
        "cluster.start_timeout_s": 120, **extra})


def _wait_cluster_idle(timeout: float = 30.0) -> None:
    """Every CPU free again and no placement-group resource left: nothing stayed placed."""
    deadline = time.time() + timeout
    while True:
        free, total = ray.available_resources(), ray.cluster_resources()
        left = [k for k in total if "_group_" in k]
        if free.get("CPU") == total.get("CPU") and not left:
            return
        assert time.time() < deadline, f"still placed on the cluster: free {free}, total {total}"
        time.sleep(0.2)


def _placed_processes() -> list[psutil.Process]:
    """Ray worker processes running one of herl's placed actors."""
    out = []
    for p in psutil.process_iter():
        try:
            if "ray::Placed" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_two_trainer_ranks_on_two_nodes_make_the_same_update_as_one_process(cluster, tmp_path):
    from safetensors.torch import load_file

    from herl.runs.rundir import open_run
    from herl.trainer_service.client import release_trainers, resident_trainer
    from herl.training.launcher import start_job
    from schemas.config import load_config
    from stages import advantages, grade, hindsight, rollout

    extra = {"train.micro_batch_size": 3, "train.ppo_epochs": 2, "train.learning_rate": 1e-3,
             "train.launcher.num_processes": 2}
    cfg = load_config(None, _ray_overrides(tmp_path, cluster, "t", **extra))
    run = open_run(cfg)
    for mod in (rollout, grade, hindsight, advantages):  # generated by one engine placed on the cluster
        mod.run(run, 0)
    from herl.generation.engines import release_engines

    release_engines()
    local = cfg.model_copy(deep=True)
    local.cluster.backend = "local"
    local.train.launcher.num_processes = 1
    one = tmp_path / "one"
    job, _ = start_job(local, run.path, 0, one)
    assert job.wait(timeout=600) == 0
    trainer, started = resident_trainer(cfg, run.path.resolve())
    nodes = {n["node_id"] for n in trainer.job.nodes}
    assert started and len(nodes) == 2, trainer.job.nodes  # rank 0 and rank 1 on different nodes
    two = tmp_path / "two"
    assert trainer.train(0, two, 600) == 0
    release_trainers()
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    start = load_file(run.snapshot(0) / "model.safetensors")
    update = max(float((a[k] - start[k]).abs().max()) for k in a)
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert update > 1e-4 and gap < 0.01 * update, (update, gap)  # tests/unit/test_trainer.py's tolerance
    m1, m2 = (json.loads((d / "train_metrics.json").read_text()) for d in (one, two))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-4, abs=1e-6)
    _wait_cluster_idle()


def test_two_engines_on_two_nodes_give_the_same_rollouts_as_one(cluster, tmp_path):
    from herl.generation.engines import (
        GenRequest,
        SamplingParams,
        derive_seed,
        load_engine,
        release_engines,
        shared_engine,
    )
    from herl.generation.ray_engines import split_points
    from herl.models.paths import resolve_model_path
    from schemas.config import load_config

    cfg = load_config(None, _ray_overrides(tmp_path, cluster, "e", **{"cluster.engines": 2, "rollout.batch_size": 8}))
    model = resolve_model_path(cfg.model.path)
    tok_ids = [[1, 2, 3 + i, 4, 5 + 2 * i][: 3 + i % 3] for i in range(6)]
    requests = [GenRequest(f"p{i}", ids, derive_seed(0, 0, f"p{i}"), 4) for i, ids in enumerate(tok_ids)]
    params = SamplingParams(1.0, 1.0, 0, 12)
    assert len(split_points([r.n for r in requests], 2, 8)) == 2  # the prompts are split: 3 requests each
    one = load_engine("transformers", model, batch_size=8).generate(requests, params)
    engines = shared_engine("transformers", model, "float32", 8, cfg.vllm, cfg.cluster, tmp_path)
    assert len({n["node_id"] for n in engines.group.nodes}) == 2
    two = engines.generate(requests, params)
    assert [[c.token_ids for c in cs] for cs in two] == [[c.token_ids for c in cs] for cs in one]
    flat = [[x for cs in out for c in cs for x in c.logprobs] for out in (one, two)]
    assert flat[1] == pytest.approx(flat[0], rel=1e-5, abs=1e-6)  # other threads: sums in another order
    release_engines()
    assert not list(tmp_path.glob(".cluster-check-*"))  # the shared-folder token went with the check
    _wait_cluster_idle()


def _tables(run_dir: Path) -> dict[str, list]:
    """Every iteration's data tables, rows in written order (metrics left out, and the run's
    name: run_id, and snapshot_id, which names the run; the weights are compared apart)."""
    import pyarrow.parquet as pq

    return {f"{f.parent.name}/{f.name}": [{k: v for k, v in r.items() if k not in ("run_id", "snapshot_id")}
                                          for r in pq.read_table(f).to_pylist()]
            for f in sorted(run_dir.glob("iter-*/*.parquet")) if not f.name.startswith("metrics")}


def _differs(a, b, where: str = "") -> str | None:
    """Where two tables differ, or None: equal, but floats to 1e-5 (the sampled tokens are
    equal; a log-prob summed by another number of threads differs in its last bits)."""
    if isinstance(a, float) and isinstance(b, float):
        return None if b == pytest.approx(a, rel=1e-5, abs=1e-6) else f"{where}: {a} != {b}"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: columns {sorted(a)} != {sorted(b)}"
        return next((d for k in a if (d := _differs(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} rows != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _differs(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {a!r} != {b!r}"


def _weights(snapshot: Path) -> str:
    return hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()


def _herl(*args: str) -> list[str]:
    return [sys.executable, "-m", "herl.commands.cli", *args]


def _set_args(overrides: dict) -> list[str]:
    return [x for k, v in overrides.items() for x in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def ray_run(cluster, tmp_path_factory):
    """A 2-iteration run on the cluster (2 trainer ranks, 2 engines), stages run in order
    without Prefect, and the same run with backend = local (2 processes)."""
    from herl.runs.rundir import open_run
    from schemas.config import load_config
    from stages import run_iteration
    from stages.train import release_trainer

    runs = tmp_path_factory.mktemp("runs")
    extra = {"train.launcher.num_processes": 2, "cluster.engines": 2, "rollout.batch_size": 8}
    out = {}
    for backend in ("ray", "local"):
        run = open_run(load_config(None, _ray_overrides(runs, cluster, backend, **extra, **{"cluster.backend": backend})))
        try:
            for k in range(2):
                run_iteration(run, k)
        finally:
            release_trainer(run)
        out[backend] = run
    from herl.generation.engines import release_engines

    release_engines()
    return out, extra


def test_a_ray_run_makes_the_same_tables_as_a_local_run(ray_run):
    runs, _ = ray_run
    ray_tables, local_tables = _tables(runs["ray"].path), _tables(runs["local"].path)
    assert ray_tables.keys() == local_tables.keys() and len(ray_tables) >= 10
    assert _differs(ray_tables, local_tables) is None, _differs(ray_tables, local_tables)
    assert _weights(runs["ray"].snapshot(2)) == _weights(runs["local"].snapshot(2))
    assert not list(runs["ray"].path.glob(".trainer-*"))  # the control folder went with the trainer
    _wait_cluster_idle()


def test_killed_trainer_rank_and_engine_fail_their_stage_and_resume_identically(ray_run, cluster, tmp_path):
    """`herl run` on the cluster; rank 1 of the trainer is killed mid-step (iteration 0);
    `herl resume`, during which an engine is killed mid-rollout (iteration 1); `herl
    resume` again: the tables and final weights of the run never killed."""
    from herl.runs.status import stage_status

    runs, extra = ray_run
    ov = _ray_overrides(tmp_path, cluster, "killed", **extra, **{"rollout.max_tokens": 48})
    run_dir = tmp_path / "killed"

    def run_until(cmd: list[str], ready, victim) -> subprocess.CompletedProcess:
        log = open(tmp_path / "log.txt", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 400
        try:
            while not ready():
                assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
                assert time.time() < deadline, "the stage to kill never started"
                time.sleep(0.02)
            victim().kill()
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        return subprocess.CompletedProcess(cmd, proc.returncode, (tmp_path / "log.txt").read_text(), "")

    def requested_not_answered() -> bool:
        controls = list(run_dir.glob(".trainer-*"))
        return bool(controls) and (controls[0] / "request-0.json").exists() and not (controls[0] / "reply-0.json").exists()

    def rank(i: int):
        def find():  # the trainer says where it placed each rank
            import re

            line = next(x for x in (tmp_path / "log.txt").read_text().splitlines() if "trainer ranks placed" in x)
            return psutil.Process(int(re.search(rf"rank {i} on .*? pid (\d+)", line).group(1)))
        return find

    # the reference run used other settings' max_tokens: compare with a run of these settings below
    first = run_until(_herl("run", "--run-id", "killed", "--runs-dir", str(tmp_path), "--iterations", "2",
                            *_set_args(ov)), requested_not_answered, rank(1))
    assert first.returncode != 0, first.stdout[-3000:]
    lost = [x for x in first.stdout.splitlines() if "trainer ranks: rank 1 on node" in x and "was lost" in x]
    assert lost, first.stdout[-3000:]
    status = {(r["iteration"], r["stage"]): r["status"] for r in stage_status(run_dir)}
    assert status[(0, "train")] != "done" and status[(0, "advantages")] == "done"
    before = {f: f.stat().st_mtime_ns for f in run_dir.glob("iter-0/*.parquet")}

    def engine_pids() -> list[int]:  # the engines placed by this command, as it says
        import re

        lines = [x for x in (tmp_path / "log.txt").read_text().splitlines() if "engines (transformers) placed" in x]
        return [int(x) for x in re.findall(r"pid (\d+)", lines[-1])] if lines else []

    def generating() -> bool:
        for pid in engine_pids():
            try:
                if "Placed.invoke" in " ".join(psutil.Process(pid).cmdline()):
                    return True
            except psutil.Error:
                pass
        return False

    def an_engine():
        return next(p for p in map(psutil.Process, engine_pids()) if "Placed.invoke" in " ".join(p.cmdline()))

    second = run_until(_herl("resume", str(run_dir)), generating, an_engine)
    assert second.returncode != 0, second.stdout[-3000:]
    assert any("was lost during generation" in x for x in second.stdout.splitlines()), second.stdout[-3000:]
    third = subprocess.run(_herl("resume", str(run_dir)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    # only the failed stages were redone: iteration 0's tables before its train stage stand
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())
    # identical to the same settings never killed (in process)
    from herl.runs.rundir import open_run
    from schemas.config import load_config
    from stages import run_iteration
    from stages.train import release_trainer

    clean = open_run(load_config(None, {**ov, "run_id": "clean"}))
    try:
        for k in range(2):
            run_iteration(clean, k)
    finally:
        release_trainer(clean)
        from herl.generation.engines import release_engines

        release_engines()
    assert _differs(_tables(run_dir), _tables(clean.path)) is None, _differs(_tables(run_dir), _tables(clean.path))
    assert _weights(run_dir / "snapshots" / "policy-2") == _weights(clean.snapshot(2))
    _wait_cluster_idle()
    _, alive = psutil.wait_procs(_placed_processes(), timeout=30)  # a killed actor's process takes a moment
    assert not alive, alive


def test_a_node_that_cannot_see_the_run_folder_is_refused_by_name(cluster, tmp_path):
    """A third node whose raylet runs in a mount namespace where the runs folder is an empty
    tmpfs (as a node without the shared mount would be): the trainer rank pinned to it is
    refused before it trains, naming that node."""
    from herl.cluster.ray_backend import ClusterError
    from herl.runs.rundir import open_run
    from herl.trainer_service.client import resident_trainer
    from schemas.config import load_config

    runs = tmp_path / "runs"
    runs.mkdir()
    here = _ns("self", "mnt")
    _ray_start(f"--address=127.0.0.1:{PORT}", "--num-cpus=1", '--resources={"blind": 1}',
               prefix=("unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f'mount -t tmpfs tmpfs "{runs}" && exec "$0" "$@"'))
    try:
        cfg = load_config(None, _ray_overrides(runs, cluster, "blind", **{"cluster.trainer_resources": {"blind": 1}}))
        run = open_run(cfg)
        with pytest.raises(ClusterError) as err:
            resident_trainer(cfg, run.path.resolve())
        msg = str(err.value)
        assert f"the run folder {run.path.resolve()} is not shared" in msg and "cannot read the token" in msg, msg
        assert msg.count("node 127.0.0.1") == 1, msg  # that node only
        assert not list(run.path.glob(".cluster-check-*"))
        _wait_cluster_idle()
    finally:
        _kill_all([p for p in _processes_in("net", _ns("self", "net") or "") if _ns(p.pid, "mnt") != here])
