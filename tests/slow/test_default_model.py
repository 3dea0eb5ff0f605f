"""Smoke tests on the real embedded default model (SmolLM2-135M-Instruct). Slow, but run in CI."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import headlab as hl
from headlab.cli.app import main
from headlab.models.load import load_model
from headlab.runs import RunDir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_layout_and_zero_oracle_on_the_real_model(smol):
    from oracles import edited

    model, tok = smol
    layout = hl.describe(model)
    assert (layout.family.name, layout.shape, layout.n_kv_heads) == ("llama", (30, 9, 64), 3)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with hl.intervene(model, hl.Plan.of({(20, 4): hl.Zero()})):
            got = model(input_ids=ids).logits
        want = edited(model, [(20, 4, "zero", None)])(input_ids=ids).logits
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-5
    assert float((got - clean).abs().max()) > 1e-3


def test_sweep_cli_on_the_default_model(smol, tmp_path):
    out = tmp_path / "smoke"
    argv = [
        "sweep",
        "--data",
        "python-docs",
        "--seq-len",
        "32",
        "--n-blocks",
        "2",
        "--n-stats-blocks",
        "4",
        "--heads",
        "0.0,14.3,29.8",
        "--method",
        "zero,mean,peak",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 9
    base = float(table["baseline"].iloc[0])
    assert 1.5 < base < 6.0  # nats/token on CPython's documentation
    model, _ = smol
    batch = RunDir(out, {}).load_tokens()
    stats = hl.Stats.load(out / "stats.safetensors", model=model)
    row = table[(table.method == "peak") & (table.layer == 14) & (table["head"] == 3)]
    direct = hl.evaluate(model, batch, ["ce"], plan=hl.Plan.of({(14, 3): hl.Peak()}), stats=stats)[
        "ce"
    ].mean
    assert float(row["value"].iloc[0]) == pytest.approx(direct, rel=1e-5)


def test_run_demo_twin_writes_the_cli_run_directory(smol, tmp_path):
    """``hl.run_demo`` and ``headlab demo`` (shrunk: one 9-token sequence, zero ablation) write
    the same table over all 270 heads of the default model."""
    hl.run_demo(out=tmp_path / "py", methods=["zero"], n=1, seq_len=9)
    argv = ["demo", "--method", "zero", "--n", "1", "--seq-len", "9", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    got = pd.read_parquet(tmp_path / "cli" / "results.parquet")
    assert len(got) == 270
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "py" / "results.parquet"), got)
