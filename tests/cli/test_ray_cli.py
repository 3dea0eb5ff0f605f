"""Jobs on Ray workers (one local cluster for the session, tiny model): the run directory equals
the serial one bit for bit, runs resume across executors, a worker killed mid-part is replaced and
its part retried, a worker that cannot load the model is named, and the bad-input errors."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import headlab as hl
from headlab.cli.app import main
from headlab.errors import ConfigError
from headlab.jobs.executors import RayExecutor
from headlab.parts import Part
from headlab.runs import RunDir, read_manifest

pytestmark = pytest.mark.usefixtures("ray_cluster")

DOCS = dict(data="python-docs", seq_len=16, n_blocks=3, n_stats_blocks=4, batch_size=2)
SWEEP = dict(**DOCS, methods=["zero", "mean"], metrics=["ce", "top1"], bins=50, reservoir=2)
GATE = dict(task="induction", seq_len=17, n_blocks=3, steps=3, masks=2)


@pytest.fixture(scope="module")
def pool():
    """Two Ray workers shared by the module's jobs (an Executor value: jobs leave it open)."""
    ex = RayExecutor(workers=2)
    yield ex
    ex.close()


@pytest.fixture
def own_workers(pool):
    """The shared workers stopped (they hold the cluster's 2 CPUs), so a job can start its own."""
    pool.close()


@pytest.fixture(scope="module")
def serial_sweep(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "sweep"
    hl.run_sweep(out=out, model=tiny_folder, **SWEEP)
    return out


def results(out: Path, name: str = "results.parquet") -> pd.DataFrame:
    return pd.read_parquet(out / name)


def same(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        read = pd.read_csv if name.endswith(".csv") else pd.read_parquet
        pd.testing.assert_frame_equal(read(a / name), read(b / name), check_exact=True)
    assert read_manifest(a)["identity"] == read_manifest(b)["identity"]


def sweep_args(folder, out, *extra):
    return ["sweep", "--model", folder, "--data", "python-docs", "--seq-len", "16", "--n-blocks",
            "3", "--n-stats-blocks", "4", "--method", "zero,mean", "--metric", "ce,top1",
            "--bins", "50", "--reservoir", "2", "--batch-size", "2", "--quiet", "--out", str(out),
            *extra]  # fmt: skip


def test_sweep_on_ray_equals_serial_and_leaves_a_joined_cluster_running(
    tiny_folder, serial_sweep, tmp_path, ray_cluster, own_workers
):
    out = tmp_path / "ray"
    assert main(sweep_args(tiny_folder, out, "--executor", "ray", "--workers", "2")) == 0
    same(serial_sweep, out, ["results.parquet", "ranking.csv"])
    assert read_manifest(out)["status"] == "complete"
    assert ray_cluster.is_initialized()  # the session's cluster: joined, not shut down
    deadline = time.monotonic() + 30  # the job's workers are gone: their CPUs come back
    while ray_cluster.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == 2


def _prune(folder, out, **kw):
    return hl.run_prune(
        out=out, model=folder, **DOCS, methods=["zero", "mean"], orders=["random", "sweep"],
        fractions=[0, 0.5, 1], seeds=[0], bins=50, **kw,
    )  # fmt: skip


def _compare(folder, out, **kw):
    return hl.run_compare(
        out=out, model=folder, **DOCS, methods=["zero"], measures=["atp", "attention"],
        bootstrap=50, top_k=3, bins=50, **kw,
    )  # fmt: skip


def _gate(folder, out, **kw):
    return hl.run_gate(out=out, model=folder, **GATE, **kw)


def _l0(folder, out, **kw):
    return hl.run_l0(out=out, model=folder, task="induction", seq_len=17, n_blocks=3, steps=3,
                     lams=[0, 1], **kw)  # fmt: skip


def _steer(folder, out, **kw):  # parts that generate text: the tokenizer is rebuilt on workers
    return hl.run_steer(
        out=out, model=folder, concept="the,of,to,is", prompts=["The value of the", "It is"],
        alphas=(0.0, 2.0), n_random=1, max_new_tokens=4, k=2, seq_len=16, n_blocks=2,
        off_task="induction", n_task=2, batch_size=2, **kw,
    )  # fmt: skip


def _estimate(folder, out, **kw):  # the exact check runs as sweep parts
    return hl.run_estimate(
        out=out, model=folder, **DOCS, methods=["atp:zero", "atp:mean"], exact_top=3, n_random=2,
        bins=50, **kw,
    )  # fmt: skip


JOBS = {
    "estimate": (_estimate, ["estimates.parquet", "exact.parquet", "correlation.csv"]),
    "prune": (_prune, ["results.parquet", "summary.csv", "removable.csv"]),
    "compare": (_compare, ["per_example.parquet", "scores.parquet", "agreement.csv"]),
    "gate": (_gate, ["heads.parquet", "summary.csv", "curves.parquet"]),
    "l0": (_l0, ["tradeoff.parquet", "heads.parquet", "curves.parquet"]),
    "steer": (_steer, ["results.parquet", "summary.csv", "heads.csv"]),
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_on_ray_equals_serial(job, tiny_folder, tmp_path, pool):
    run, tables = JOBS[job]
    run(tiny_folder, tmp_path / "serial")
    run(tiny_folder, tmp_path / "ray", executor=pool)
    same(tmp_path / "serial", tmp_path / "ray", tables)
    for saved in (tmp_path / "serial").glob("*.safetensors"):  # gate/l0 fits: saved by save=
        assert saved.read_bytes() == (tmp_path / "ray" / saved.name).read_bytes()
    for saved in (tmp_path / "serial").glob("*.jsonl"):  # steer's generated texts
        assert saved.read_bytes() == (tmp_path / "ray" / saved.name).read_bytes()


def _stop_after(monkeypatch, n: int) -> list[str]:
    """Make the n+1-th saved part raise Ctrl-C (the first n are saved); returns the keys saved."""
    saved: list[str] = []
    original = RunDir.save_part

    def save_part(self, key, table):
        if len(saved) == n:
            raise KeyboardInterrupt
        original(self, key, table)
        saved.append(key)

    monkeypatch.setattr(RunDir, "save_part", save_part)
    return saved


@pytest.mark.parametrize("first,then", [("ray", "serial"), ("serial", "ray")])
def test_a_run_interrupted_on_one_executor_resumes_on_the_other(
    first, then, tiny_folder, serial_sweep, tmp_path, pool, monkeypatch
):
    out = tmp_path / "run"
    executors: dict[str, Any] = {"ray": pool, "serial": "serial"}
    with monkeypatch.context() as mp:
        saved = _stop_after(mp, 2)
        with pytest.raises(KeyboardInterrupt):
            hl.run_sweep(out=out, model=tiny_folder, executor=executors[first], **SWEEP)
    assert len(saved) == 2 and read_manifest(out)["status"] == "interrupted"
    ran = []
    monkeypatch.setattr(RunDir, "save_part", _counting(RunDir.save_part, ran))
    hl.run_sweep(out=out, model=tiny_folder, executor=executors[then], **SWEEP)
    assert len(ran) == 6 - 2 and not set(ran) & set(saved)  # only the missing parts, once each
    same(serial_sweep, out, ["results.parquet", "ranking.csv"])


def _counting(save, keys: list[str]):
    def save_part(self, key, table):
        keys.append(key)
        save(self, key, table)

    return save_part


@dataclass(frozen=True)
class KillOnce(Part):
    """A part that SIGKILLs its own worker the first time it runs (``marker`` not yet written),
    then runs ``inner``; everything else is ``inner``'s."""

    inner: Any
    marker: str

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("inner", "marker"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run(self, ctx, on_forward=None):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.run(ctx, on_forward)


def test_a_worker_killed_mid_part_is_replaced_and_the_part_retried(
    tiny_folder, serial_sweep, tmp_path, pool, monkeypatch, ray_cluster
):
    import headlab.jobs.sweep as job

    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = str(tmp_path / "killed")
    plan = job.sweep_plan

    def killing_plan(*args, **kw):
        parts = plan(*args, **kw)
        return [KillOnce(p, marker) if i == 1 else p for i, p in enumerate(parts)]

    monkeypatch.setattr(job, "sweep_plan", killing_plan)
    keys: list[str] = []
    monkeypatch.setattr(RunDir, "save_part", _counting(RunDir.save_part, keys))
    out = tmp_path / "ray"
    hl.run_sweep(out=out, model=tiny_folder, executor=pool, **SWEEP)
    killed = int(Path(marker).read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)  # that worker process is gone
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 6  # every part saved once
    same(serial_sweep, out, ["results.parquet", "ranking.csv"])


def test_a_worker_that_cannot_load_the_model_names_its_node_and_the_path(
    tiny_folder, serial_sweep, tmp_path, own_workers
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    prepared = hl.jobs.prepare(hl.jobs.Inputs(
        model=str(folder), data="python-docs", seq_len=16, n_blocks=3, n_stats_blocks=4,
    ))  # fmt: skip
    shutil.rmtree(folder)  # loaded here, missing where the workers look
    out = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        hl.run_sweep(out=out, prepared=prepared, executor="ray", workers=1, **SWEEP)
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert "the Ray worker on node" in message and str(folder) in message
    import ray

    assert ray.util.get_node_ip_address() in message
    assert "re-run the same command to resume" in message
    hl.run_sweep(out=out, prepared=prepared, **SWEEP)  # the run resumes, serially here
    pd.testing.assert_frame_equal(results(serial_sweep), results(out), check_exact=True)


# --- bad input -----------------------------------------------------------------------------------


def test_gpus_per_worker_on_a_cluster_without_gpus_names_the_fix(tiny_folder, tmp_path, capsys):
    argv = sweep_args(tiny_folder, tmp_path / "o", "--executor", "ray", "--gpus-per-worker", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--gpus-per-worker 1 asks for GPUs but the local Ray cluster has none" in err
    assert "use --gpus-per-worker 0" in err
