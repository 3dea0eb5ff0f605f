"""Run directories that cannot be corrupted: checksums verified on resume, a damaged manifest, one
writer at a time (across processes and threads), atomic writes, a full disk and a read-only --out.

Most cases drive :class:`headlab.runs.RunDir` directly; a few run ``headlab sweep`` on a tiny model
to show that a damaged part or a full disk still ends in the identical table."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch

from headlab.errors import ConfigError
from headlab.runs import RunDir, atomic_path

ID = {"model": "tiny", "seed": 0}
SRC = str(Path(__file__).resolve().parents[2] / "src")


def table(n: int = 3, start: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame({"layer": range(n), "value": [start + i for i in range(n)]})


def opened(out: Path, messages: list[str] | None = None, **kw) -> RunDir:
    say = messages.append if messages is not None else None
    return RunDir.open(out, kind="sweep", identity=ID, command=["test"], on_status=say, **kw)


def written(out: Path) -> RunDir:
    """A run with parts a, b and a tensor file, released as a finished job leaves it."""
    run = opened(out)
    run.save_part("a", table(3))
    run.save_part("b", table(4, 10.0))
    run.save_tensors("stats.safetensors", {"value": torch.arange(6.0)})
    run.set_status("complete")
    return run


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if ".tmp" in p.name)


# -- checksums ----------------------------------------------------------------------------------
def test_save_part_records_sha256_and_size_in_the_manifest(tmp_path):
    out = tmp_path / "run"
    written(out)
    rec = manifest(out)["files"]["parts/a.parquet"]
    data = (out / "parts" / "a.parquet").read_bytes()
    assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert "stats.safetensors" in manifest(out)["files"]
    assert leftovers(out) == []


def test_resume_recomputes_a_part_that_fails_its_checksum(tmp_path):
    out = tmp_path / "run"
    written(out)
    part = out / "parts" / "a.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    part.write_bytes(bytes(data))
    said: list[str] = []
    run = opened(out, said)
    assert said == ["part a failed its checksum; recomputing"]
    assert run.dropped == [("parts/a.parquet", "failed its checksum")]
    assert run.done_parts() == {"b"} and not part.exists()
    assert "parts/a.parquet" not in manifest(out)["files"]
    run.save_part("a", table(3))  # the job recomputes it
    want = pd.concat([table(3), table(4, 10.0)], ignore_index=True)
    pd.testing.assert_frame_equal(run.load_parts(), want)
    run.close()


def test_resume_recomputes_a_truncated_part_and_warns_without_a_status_callback(tmp_path):
    out = tmp_path / "run"
    written(out)
    part = out / "parts" / "b.parquet"
    size = part.stat().st_size
    part.write_bytes(part.read_bytes()[: size // 2])
    with pytest.warns(
        RuntimeWarning, match=rf"part b is truncated \({size // 2} of {size} bytes\)"
    ):
        run = opened(out)
    assert run.done_parts() == {"a"}
    run.close()


def test_a_part_deleted_by_hand_is_recomputed_quietly(tmp_path):
    out = tmp_path / "run"
    written(out)
    (out / "parts" / "a.parquet").unlink()
    said: list[str] = []
    run = opened(out, said)  # no warning (pytest turns warnings into errors)
    assert said == ["part a is missing; recomputing"] and run.done_parts() == {"b"}
    run.close()


def test_a_damaged_tensor_file_is_removed_and_recomputed(tmp_path):
    out = tmp_path / "run"
    written(out)
    stats = out / "stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:-8])
    said: list[str] = []
    run = opened(out, said)
    assert len(said) == 1 and said[0].startswith("stats.safetensors is truncated (")
    assert (
        run.verified("stats.safetensors") is None and run.load_tensors("stats.safetensors") is None
    )
    run.save_tensors("stats.safetensors", {"value": torch.arange(6.0)})
    assert torch.equal(run.load_tensors("stats.safetensors")["value"], torch.arange(6.0))
    run.close()


def test_a_file_damaged_during_the_run_is_dropped_when_read(tmp_path):
    out = tmp_path / "run"
    run = opened(out, [])
    run.save_part("a", table())
    run.save_tensors("theta.safetensors", {"value": torch.ones(2)})
    (out / "parts" / "a.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match=r"part a of .* re-run the same command to recompute it"):
        run.load_parts()
    assert run.done_parts() == set()
    (out / "theta.safetensors").write_bytes(b"\x00" * 8)
    assert run.load_tensors("theta.safetensors") is None  # the gate job refits
    assert not (out / "theta.safetensors").exists()
    run.close()


def test_damaged_tokens_give_a_clear_error(tmp_path):
    from headlab.batch import Batch

    out = tmp_path / "run"
    run = opened(out)
    run.save_tokens(Batch(input_ids=torch.ones(2, 3, dtype=torch.long)))
    run.close()
    (out / "tokens.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"tokens\.safetensors is truncated .*delete the file"):
        RunDir(out, manifest(out)).load_tokens()
    with pytest.raises(ConfigError, match=r"tokens\.safetensors is unreadable"):
        RunDir(out, {}).load_tokens()  # no checksum: the header is checked


def test_a_run_written_before_checksums_resumes_and_adopts_its_parts(tmp_path):
    """The previous release's layout: no ``files`` in the manifest, plain Parquet parts, a stray
    temporary file from a kill. Good parts are kept (and now checksummed), a torn one redone."""
    out = tmp_path / "old"
    (out / "parts").mkdir(parents=True)
    old = {"kind": "sweep", "identity": ID, "command": ["x"], "created": "2024-01-01T00:00:00",
           "versions": {}, "status": "running", "resumed": 0}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(old))
    table(3).to_parquet(out / "parts" / "a.parquet", index=False)
    table(4).to_parquet(out / "parts" / "b.parquet", index=False)
    torn = (out / "parts" / "b.parquet").read_bytes()
    (out / "parts" / "b.parquet").write_bytes(torn[:-20])
    (out / "parts" / ".c.tmp").write_bytes(b"garbage")
    said: list[str] = []
    run = opened(out, said)
    assert len(said) == 1 and said[0].startswith("part b is unreadable (")
    assert said[0].endswith("; recomputing")
    assert run.done_parts() == {"a"} and leftovers(out) == []
    m = manifest(out)
    assert m["resumed"] == 1 and m["created"] == "2024-01-01T00:00:00"  # old keys kept
    data = (out / "parts" / "a.parquet").read_bytes()
    assert m["files"]["parts/a.parquet"]["sha256"] == hashlib.sha256(data).hexdigest()
    run.close()


# -- a damaged manifest -------------------------------------------------------------------------
@pytest.mark.parametrize("text", ['{"kind": "sweep", "identity": {"mo', "", "[1, 2]", "\xff\xfe"])
def test_a_damaged_manifest_names_force(tmp_path, text):
    out = tmp_path / "run"
    written(out)
    (out / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        opened(out)
    msg = str(err.value)
    assert msg.startswith(f"{out / 'manifest.json'} is damaged (")
    assert msg.endswith("; pass --force to start over, or restore it")
    run = opened(out, force=True)  # starts over
    assert run.done_parts() == set() and manifest(out)["resumed"] == 0
    run.close()


# -- one writer at a time -----------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {src!r})
    from headlab.runs import RunDir
    run = RunDir.open({out!r}, kind="sweep", identity={ident!r}, command=["holder"])
    print("locked", flush=True)
    sys.stdin.readline()
    {finish}
    """
)


def holder(out: Path, finish: str = "run.set_status('complete')") -> subprocess.Popen:
    code = HOLDER.format(src=SRC, out=str(out), ident=ID, finish=finish)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_told_who_holds_the_directory(tmp_path):
    out = tmp_path / "run"
    proc = holder(out)
    try:
        for force in (False, True):  # --force never pulls a directory from under its writer
            with pytest.raises(ConfigError) as err:
                opened(out, force=force)
            msg = str(err.value)
            assert msg.startswith(f"{out} is in use by process {proc.pid} on ")
            assert " since 20" in msg and msg.endswith("; wait, or pass a different --out")
        assert (out / "manifest.json").is_file()
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    assert not Path(f"{out}.lock").exists()  # released and removed
    run = opened(out)  # the holder finished: this one resumes
    assert run.manifest["resumed"] == 1
    run.close()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    proc = holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert Path(f"{out}.lock").exists()  # a stale lock file stays behind...
    run = opened(out)  # ...and is taken over
    assert json.loads(Path(f"{out}.lock").read_text())["pid"] == os.getpid()
    run.close()
    assert not Path(f"{out}.lock").exists()


def test_a_stale_lock_file_with_any_content_is_taken_over(tmp_path):
    out = tmp_path / "run"
    Path(f"{out}.lock").write_text('{"pid": 999999, "host": "gone"')
    run = opened(out)
    run.close()


def _race(out: str, barrier, results) -> None:
    sys.path.insert(0, SRC)
    import time as _time

    from headlab.errors import ConfigError as Err
    from headlab.runs import RunDir as Dir

    barrier.wait()
    try:
        run = Dir.open(out, kind="sweep", identity=ID, command=["race"])
    except Err as err:
        results.put(("refused", str(err)))
        return
    run.save_part("a", table())
    _time.sleep(1.5)  # still writing when the other one looks
    run.set_status("complete")
    results.put(("ran", ""))


def test_two_commands_started_together_one_runs_one_is_refused(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    out = str(tmp_path / "run")
    procs = [ctx.Process(target=_race, args=(out, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [g[0] for g in got] == ["ran", "refused"]
    assert "is in use by process" in got[1][1] and "pass a different --out" in got[1][1]


def test_another_thread_is_refused_and_the_lock_is_released_by_close_with_and_status(tmp_path):
    out = tmp_path / "run"
    errors: list[str] = []

    def other() -> None:
        try:
            opened(out).close()
        except ConfigError as err:
            errors.append(str(err))

    def try_in_thread() -> bool:
        errors.clear()
        t = threading.Thread(target=other)
        t.start()
        t.join()
        return not errors

    run = opened(out)
    assert not try_in_thread() and "in use by this process" in errors[0]
    run.close()
    assert try_in_thread()
    with opened(out):
        assert not try_in_thread()
    assert try_in_thread()
    run = opened(out)
    run.set_status("interrupted")  # a final status releases
    assert try_in_thread()


def test_the_same_thread_takes_over_a_run_its_earlier_job_never_closed(tmp_path):
    """A job that raised leaves its RunDir alive in the traceback; re-running it in the same
    thread (a notebook cell) must not be told to wait for itself."""
    out = tmp_path / "run"
    abandoned = opened(out)
    again = opened(out)
    assert abandoned._lock is not None and abandoned._lock.fd is None
    again.close()


# -- atomic writes, a full disk, a read-only --out ------------------------------------------------
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "x.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        (tmp.parent / (tmp.name + ".tmp")).write_text("a writer's own temporary")
        raise RuntimeError("writer died")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_figures_keep_their_format(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = opened(tmp_path / "run")
    fig = plt.figure()
    run.save_figure("f.png", fig)
    run.save_figure("f.svg", fig)
    plt.close(fig)
    assert (tmp_path / "run" / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "run" / "f.svg").read_bytes()[:500]
    assert {"f.png", "f.svg"} <= set(manifest(tmp_path / "run")["files"])
    run.close()


def enospc_once(monkeypatch, method: str = "to_parquet") -> None:
    real = getattr(pd.DataFrame, method)
    state = {"left": 1}

    def full(self, path, *a, **kw):
        if state["left"]:
            state["left"] -= 1
            Path(path).write_bytes(b"PAR1 half a part")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, *a, **kw)

    monkeypatch.setattr(pd.DataFrame, method, full)


def test_disk_full_names_the_file_and_removes_the_temporary(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run = opened(out)
    run.save_part("a", table())
    enospc_once(monkeypatch)
    with pytest.raises(ConfigError) as err:
        run.save_part("b", table())
    assert str(err.value) == (
        f"disk full while writing {out / 'parts' / 'b.parquet'}; free space and re-run the same "
        "command to resume"
    )
    assert leftovers(out) == [] and run.done_parts() == {"a"}
    assert "parts/b.parquet" not in manifest(out)["files"]
    run.close()


def test_disk_full_inside_a_library_that_only_says_so_in_words(tmp_path, monkeypatch):
    import safetensors.torch as st

    def full(*a, **kw):
        raise RuntimeError(
            "Error while serializing: IoError(No space left on device (os error 28))"
        )

    monkeypatch.setattr(st, "save_file", full)
    run = opened(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"disk full while writing .*stats\.safetensors; free"):
        run.save_tensors("stats.safetensors", {"value": torch.ones(1)})
    run.close()


def test_a_read_only_out_is_a_clear_error(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.open

    def denied(path, *a, **kw):
        if str(path).startswith(str(parent)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ConfigError) as err:
        opened(parent / "run")
    assert str(err.value).startswith(f"cannot write to {parent / 'run'} (permission denied")
    assert str(err.value).endswith("; choose a writable --out")
    monkeypatch.setattr(os, "open", real)
    run = opened(tmp_path / "ok")  # a file the run writes later is refused the same way

    def no(self, path, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", no)
    with pytest.raises(ConfigError) as err:
        run.save_table("summary.csv", table())
    assert str(err.value) == (
        f"cannot write to {tmp_path / 'ok'} (permission denied); choose a writable --out"
    )
    assert leftovers(tmp_path / "ok") == []
    run.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod")
def test_a_read_only_out_by_chmod(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"permission denied.*choose a writable --out"):
            opened(parent / "run")
    finally:
        parent.chmod(0o755)


# -- the cascade: rounds after a dropped one are redone -------------------------------------------
def test_cascade_keeps_only_the_rounds_before_a_dropped_one(tmp_path):
    from headlab.jobs.cascade import finished_rounds as _finished_rounds

    run = opened(tmp_path / "run", [])
    for step in range(4):
        rows = pd.DataFrame({"step": [step] * 2, "layer": [step, 9], "head": [1, 9],
                             "removed": [True, False]})  # fmt: skip
        run.save_part(f"cascade-step{step:03d}", rows)
    (run.path / "parts" / "cascade-step001.parquet").unlink()
    assert _finished_rounds(run) == [(0, 1)]
    assert run.done_parts() == {"cascade-step000"}
    run.close()


# -- end to end: headlab sweep on a tiny model ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_folder import make_model_folder

    return str(make_model_folder(tmp_path_factory.mktemp("tiny-llama")))


def sweep(folder: str, out: Path) -> list[str]:
    return ["sweep", "--model", folder, "--data", "python-docs", "--seq-len", "16",
            "--n-blocks", "2", "--n-stats-blocks", "2", "--method", "zero,mean", "--metric", "ce",
            "--out", str(out), "--batch-size", "2", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def clean_table(tiny, tmp_path_factory):
    from headlab.cli.app import main

    out = tmp_path_factory.mktemp("clean") / "run"
    assert main(sweep(tiny, out)) == 0
    return pd.read_parquet(out / "results.parquet")


def test_sweep_after_a_full_disk_resumes_to_the_identical_table(
    tiny, clean_table, tmp_path, monkeypatch, capsys
):
    from headlab.cli.app import main

    out = tmp_path / "run"
    real = RunDir.save_part
    calls = {"n": 0}

    def full_on_third(self, key, part):
        calls["n"] += 1
        if calls["n"] == 3:
            enospc_once(monkeypatch)
        return real(self, key, part)

    monkeypatch.setattr(RunDir, "save_part", full_on_third)
    assert main(sweep(tiny, out)) == 2
    err = capsys.readouterr().err
    assert "headlab: error: disk full while writing " in err and f"{out}/parts/" in err
    assert "free space and re-run the same command to resume" in err
    assert leftovers(out) == [] and len(RunDir(out, {}).done_parts()) == 2
    assert not Path(f"{out}.lock").exists()  # the job released the directory
    monkeypatch.undo()
    assert main(sweep(tiny, out)) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), clean_table,
                                  check_exact=True)  # fmt: skip


def test_sweep_recomputes_a_corrupted_part_and_stats_to_the_identical_table(
    tiny, clean_table, tmp_path, capsys
):
    from headlab.cli.app import main

    out = tmp_path / "run"
    assert main(sweep(tiny, out)) == 0
    part = sorted((out / "parts").glob("*.parquet"))[1]
    data = bytearray(part.read_bytes())
    data[40] ^= 0x01
    part.write_bytes(bytes(data))
    (out / "stats.safetensors").write_bytes((out / "stats.safetensors").read_bytes()[:100])
    argv = [a for a in sweep(tiny, out) if a != "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"headlab: part {part.stem} failed its checksum; recomputing" in err
    assert "headlab: stats.safetensors is truncated" in err
    assert "collecting statistics" in err
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), clean_table,
                                  check_exact=True)  # fmt: skip
