"""scripts/findings.py: the verdict rule, fenced blocks rewritten with prose kept, missing runs
rendered as not re-run with their previous verdicts, verdicts computed from intervals."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPTS = Path(__file__).parents[2] / "scripts"


def _module(name: str = "findings"):
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", SCRIPTS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(SCRIPTS))


def test_verdict_rule_decides_from_the_interval_and_its_side():
    r = _module("findings_rule")
    assert r.verdict(0.2, 0.4, 0.1, ">") == "agrees"
    assert r.verdict(-0.3, 0.05, 0.1, ">") == "disagrees"
    assert r.verdict(0.05, 0.3, 0.1, ">") == "inconclusive"
    assert r.verdict(0.2, 0.4, 0.1, "<") == "disagrees"
    assert r.verdict(-0.3, 0.05, 0.1, "<") == "agrees"
    assert r.verdict(0.1, 0.3, 0.1, ">") == "inconclusive"  # touching the threshold decides nothing
    assert r.verdict(math.nan, math.nan, 0.0, ">") == "inconclusive"  # no replicates
    with pytest.raises(ValueError):
        r.verdict(0, 1, 0, ">=")
    assert r.combine(["agrees", "agrees"]) == "agrees"
    assert r.combine(["agrees", "inconclusive"]) == "inconclusive"
    assert r.combine(["agrees", "inconclusive", "disagrees"]) == "disagrees"
    assert r.combine([]) == "inconclusive"


def test_t_interval_matches_the_textbook_value():
    r = _module("findings_rule")
    mean, lo, hi = r.t_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3: half-width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051
    assert mean == 2.0 and hi - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert lo == pytest.approx(2 * mean - hi)
    assert math.isnan(r.t_interval([1.0])[1])


def test_bootstrap_interval_covers_a_weighted_mean_and_shrinks_with_more_examples():
    r = _module("findings_rule")
    rng = np.random.default_rng(0)
    widths = []
    for n in (10, 200):
        x = rng.normal(1.0, 1.0, n)
        point, lo, hi = r.bootstrap_interval(lambda w, x=x: float(w @ x / w.sum()), n, n_boot=500)
        assert point == pytest.approx(x.mean()) and lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # about sqrt(20) narrower


def test_update_doc_rewrites_only_the_fenced_blocks():
    f = _module()
    text = (
        "intro\n<!-- auto:a -->\nold a\n<!-- /auto:a -->\nprose\n"
        "<!-- auto:b -->\nold\n<!-- /auto:b -->\n"
    )
    out, done = f.update_doc(text, {"a": "new a\nline 2", "c": "unused"})
    empty, _ = f.update_doc("<!-- auto:e -->\n<!-- /auto:e -->\n", {"e": "body"})
    assert empty == "<!-- auto:e -->\nbody\n<!-- /auto:e -->\n"
    assert done == ["a"]
    assert out == (
        "intro\n<!-- auto:a -->\nnew a\nline 2\n<!-- /auto:a -->\nprose\n"
        "<!-- auto:b -->\nold\n<!-- /auto:b -->\n"
    )


def _prune_table(deltas: dict[tuple[str, str], list[list[float]]]) -> pd.DataFrame:
    """A prune results table: ``deltas[(order, method)]`` = one ΔCE list per seed over
    fractions 0.3, 0.5, 1."""
    rows = []
    for (order, method), curves in deltas.items():
        for seed, curve in enumerate(curves):
            for f, d in zip((0.0, 0.3, 0.5, 1.0), [0.0, *curve], strict=True):
                rows += [{"order": order, "seed": seed if order == "random" else -1,
                          "method": method, "unit": "neuron", "fraction": f, "n_pruned": 0,
                          "metric": metric, "value": 3 + d, "baseline": 3.0, "delta": d,
                          "effect": d, "ranked_by": ""} for metric in ("ce", "top1")]  # fmt: skip
    return pd.DataFrame(rows)


def test_renderers_mark_missing_runs_and_decide_method_claims_from_seeds(tmp_path, monkeypatch):
    f = _module()
    sec = f.sections
    monkeypatch.setattr(sec, "RUNS", tmp_path)
    monkeypatch.setattr(f, "RUNS", tmp_path)
    assert all(render() is None for render in sec.RENDERERS.values())
    notice = f.not_rerun("prune-neurons")
    assert "Not re-run at decisive size" in notice and "previous small-run verdict" in notice
    assert "--unit neuron" in notice  # says what would decide it
    run = tmp_path / "prune-neurons"
    run.mkdir()
    (run / "manifest.json").write_text('{"command": ["headlab", "prune", "--out", "x"]}')
    # mean is clearly best on every seed; zero clearly worst; peak in between
    t = _prune_table({
        ("random", "zero"): [[2.0, 4.0, 7.0], [2.2, 4.1, 7.0], [1.9, 3.8, 7.0]],
        ("random", "mean"): [[0.5, 1.0, 2.0], [0.6, 1.1, 2.0], [0.4, 0.9, 2.0]],
        ("random", "peak"): [[0.8, 1.5, 2.6], [0.9, 1.6, 2.6], [0.8, 1.4, 2.6]],
        ("random", "resample"): [[1.0, 2.0, 4.0], [1.1, 2.1, 4.0], [0.9, 1.9, 4.0]],
    })  # fmt: skip
    t.to_parquet(run / "results.parquet")
    out = sec.render_prune_neurons()
    assert "--out runs/findings/prune-neurons" in out.body
    v = {x.key: x.verdict for x in out.verdicts}
    assert v == {"neuron-peak": "disagrees", "neuron-resample": "disagrees"}
    assert out.verdicts[0].numbers.startswith("mean < peak < resample < zero; ΔCE: peak − mean")
    # the summary compares each claim with its previous verdict
    rows = {r.split(" | ")[0].strip("| "): r for r in f.summary({x.key: x for x in out.verdicts})
            .splitlines()}  # fmt: skip
    assert rows["peak ablation degrades least (neurons)"].endswith("| no |")
    assert "not re-run at decisive size" in rows["importance is concentrated / power-law"]
    flipped = f.summary({"sweep": sec.Verdict("sweep", "disagrees", "share 0.1")})
    assert "**disagrees** (share 0.1) | reversed |" in flipped


def test_sweep_claim_from_per_example_ablations(tmp_path, monkeypatch):
    f = _module()
    sec = f.sections
    monkeypatch.setattr(sec, "RUNS", tmp_path)
    run = tmp_path / "compare"
    run.mkdir()
    (run / "manifest.json").write_text('{"command": ["headlab", "compare", "--out", "x"]}')
    rng = np.random.default_rng(1)
    n_ex, n_heads = 32, 40
    effect = np.r_[[3.0, 2.0, 1.5, 1.0], 0.5 / np.arange(1, n_heads - 3)]  # steep tail
    rows = [{"measure": "ablation:zero", "metric": "ce", "example": e, "layer": h // 8,
             "head": h % 8, "value": effect[h] + rng.normal(0, 0.05), "weight": 10.0}
            for e in range(n_ex) for h in range(n_heads)]  # fmt: skip
    pd.DataFrame(rows).to_parquet(run / "per_example.parquet")
    out = sec.render_sweep()
    assert out.verdicts[0].verdict == "agrees"
    assert "bootstrap over 32 examples" in out.body


def test_per_example_checks_reproduce_the_runs_on_a_tiny_model(tmp_path, monkeypatch):
    """The checks rebuild each run's blocks, recompute one curve per block (prune) and the shift
    per group of blocks, and agree with the runs' own means (else they stop)."""
    from tiny_folder import make_model_folder

    from headlab.cli.app import main

    checks = _module("findings_checks")
    monkeypatch.setattr(checks, "RUNS", tmp_path)
    folder = str(make_model_folder(tmp_path / "tiny"))
    common = ["--model", folder, "--data", "python-docs", "--seq-len", "16", "--quiet"]
    evals = ["--n-blocks", "4", "--n-stats-blocks", "6", "--bins", "50", "--seed", "2"]
    sweep = str(tmp_path / "sweep-docs")
    assert main(["sweep", *common, "--n-blocks", "3", "--method", "zero", "--out", sweep]) == 0
    assert main(["prune", *common, *evals, "--sweep", sweep, "--order", "random,sweep",
                 "--method", "zero", "--fractions", "0.5,0.7", "--out",
                 str(tmp_path / "prune-heads")]) == 0  # fmt: skip
    assert main(["shift", *common, *evals, "--sweep", sweep, "--top-k", "2",
                 "--out", str(tmp_path / "shift")]) == 0  # fmt: skip
    per_block = pd.read_parquet(checks.check_prune_heads())
    assert len(per_block) == 2 * 4 and set(per_block["fraction"]) == {0.5, 0.7}
    groups = pd.read_parquet(checks.check_shift(groups=2))
    assert set(groups["method"]) == {"zero", "mean", "peak", "resample"} and len(groups) == 8
    assert (groups["ratio"] >= 0).all()
    checks.check_held_out()  # 3 ranking blocks (seed 0) and 4 evaluation blocks (seed 2)
    assert "none shared" in (tmp_path / "checks" / "held-out-prune-heads.txt").read_text()
    # a run evaluated on its own ranking blocks is refused
    assert main(["prune", *common, "--n-blocks", "3", "--sweep", sweep, "--order", "sweep",
                 "--method", "zero", "--fractions", "0.5", "--out",
                 str(tmp_path / "in-sample")]) == 0  # fmt: skip
    with pytest.raises(SystemExit, match="3 evaluation blocks of in-sample rank heads"):
        checks.check_held_out(runs=("in-sample",))


def _checks_on_tiny(tmp_path, monkeypatch):
    """The checks and sections modules writing under ``tmp_path`` (200 bootstrap draws), and a
    tiny model folder."""
    from tiny_folder import make_model_folder

    f = _module()
    for mod in (f.checks, f.sections):
        monkeypatch.setattr(mod, "RUNS", tmp_path)
    monkeypatch.setattr(sys.modules["findings_rule"], "N_BOOT", 200)
    return f.checks, f.sections, str(make_model_folder(tmp_path / "tiny"))


def test_cascade_check_reproduces_the_run_and_tests_backups_on_held_out_examples(
    tmp_path, monkeypatch
):
    """The cascade check re-measures a flagged backup per example on the run's examples (equal
    to the run's means, else it stops) and on held-out ones; the render decides from the latter."""
    from headlab.cli.app import main

    checks, sec, folder = _checks_on_tiny(tmp_path, monkeypatch)
    run = tmp_path / "cascade"
    assert main(["cascade", "--model", folder, "--task", "induction", "--n-blocks", "6",
                 "--n-stats-blocks", "1", "--steps", "2", "--share", "0.1", "--off-target",
                 "none", "--out", str(run), "--quiet"]) == 0  # fmt: skip
    t = pd.read_parquet(run / "results.parquet")
    ((tl, th),) = t[(t["step"] == 0) & t["removed"]][["layer", "head"]].itertuples(index=False)
    r0, r1 = (t[(t["step"] == s) & ~t["removed"]].set_index(["layer", "head"]) for s in (0, 1))
    ly, h = r1.index[0]  # any head still in the pool: the check needs no real backup
    row = {"step": 1, "layer": ly, "head": h, "trigger_layer": tl, "trigger_head": th,
           "effect_before": r0.loc[(ly, h), "effect"], "effect_after": r1.loc[(ly, h), "effect"],
           "rise": 0.0, "trigger_effect": 1.0, "share": 0.0}  # fmt: skip
    pd.DataFrame([{**row, "effect_after": row["effect_after"] + 0.5}]).to_csv(
        run / "backups.csv", index=False
    )
    with pytest.raises(SystemExit, match="cascade check"):  # not what the run measured
        checks.check_cascade()
    pd.DataFrame([row]).to_csv(run / "backups.csv", index=False)
    per = pd.read_parquet(checks.check_cascade())
    assert sorted(per.groupby("examples").size().items()) == [("held-out", 6), ("run", 6)]
    own = per[per["examples"] == "run"]
    w = own["weight"]
    assert (w * own["effect_after"]).sum() / w.sum() == pytest.approx(row["effect_after"], abs=1e-5)
    # the verdict comes from the held-out rows: a clear rise agrees, a clear fall disagrees
    for rise, verdict in ((2.0, "agrees"), (-2.0, "disagrees")):
        held = per.assign(effect_before=0.0, trigger_effect=1.0,
                          effect_after=rise + 0.01 * np.arange(len(per)))  # fmt: skip
        held.to_parquet(tmp_path / "checks" / "cascade-backups.parquet")
        out = sec.render_cascade()
        assert out.verdicts[0].verdict == verdict
        assert "bootstrap over 6 held-out examples" in out.body


def test_gate_check_reproduces_the_validation_and_decides_on_held_out_sequences(
    tmp_path, monkeypatch
):
    """The gate check re-ablates the validation's groups and each mask's own top heads per
    sequence (equal to the run's validation.csv, else it stops) on the fitting sequences and on
    held-out ones; the render decides from the held-out ones, resampling the random sets too."""
    from headlab.cli.app import main

    checks, sec, folder = _checks_on_tiny(tmp_path, monkeypatch)
    run = tmp_path / "gate"
    assert main(["gate", "--model", folder, "--task", "induction", "--n-blocks", "6",
                 "--n-stats-blocks", "4", "--steps", "3", "--masks", "2", "--validate", "--k",
                 "2", "--random", "4", "--out", str(run), "--quiet"]) == 0  # fmt: skip
    val = pd.read_csv(run / "validation.csv")
    bad = val.copy()
    bad.loc[bad["group"] == "facilitating", "effect"] += 0.5
    bad.to_csv(run / "validation.csv", index=False)
    with pytest.raises(SystemExit, match="gate check facilitating"):  # not what the run measured
        checks.check_gate(n_held_out=8)
    val.to_csv(run / "validation.csv", index=False)
    per = pd.read_parquet(checks.check_gate(n_held_out=8))
    assert sorted(per.groupby("examples")["example"].nunique().items()) == [
        ("held-out", 8),
        ("run", 6),
    ]
    assert sorted(per.loc[per["group"] == "facilitating-mask", "draw"].unique()) == [0, 1]
    assert per[per["group"] == "random"]["draw"].nunique() == 4
    own = per[(per["examples"] == "run") & (per["group"] == "facilitating")]
    ref = val.loc[val["group"] == "facilitating", "effect"].iloc[0]
    assert (own["weight"] * own["effect"]).sum() / own["weight"].sum() == pytest.approx(
        ref, abs=1e-5
    )
    # the verdict comes from the held-out rows: labelled heads far above random agree, below
    # disagree; the fitting sequences cannot change it
    chosen = per["group"].str.startswith("facilitating")
    for lift, verdict in ((3.0, "agrees"), (-3.0, "disagrees")):
        held = per.assign(effect=np.where(chosen, lift, 0.0) + 0.01 * per["example"])
        held.loc[held["examples"] == "run", "effect"] = -lift
        held.to_parquet(tmp_path / "checks" / "gate-validation.parquet")
        out = sec.render_gate()
        assert out.verdicts[0].key == "gate" and out.verdicts[0].verdict == verdict
        assert "bootstrap over 8 held-out sequences and the 4 random sets together" in out.body


def test_vs_random_interval_carries_the_spread_of_the_random_sets():
    rule = _module("findings_rule")
    rng = np.random.default_rng(0)
    top, w = 1.0 + 0.1 * rng.standard_normal(50), np.ones(50)
    tight = np.zeros((20, 50)) + 0.01 * rng.standard_normal((20, 50))
    wide = tight + rng.normal(0, 2.0, size=(20, 1))  # each random set shifts every example
    p1, lo1, hi1 = rule.vs_random_interval(top, tight, w)
    _, lo2, hi2 = rule.vs_random_interval(top, wide, w)
    assert p1 == pytest.approx(top.mean() - tight.mean())
    assert lo1 < p1 < hi1 and hi1 - lo1 < 0.1
    assert hi2 - lo2 > 5 * (hi1 - lo1)  # resampling the sets, not only the examples
    with pytest.raises(ValueError, match="random must be"):
        rule.vs_random_interval(top, tight[:, :10], w)


def _manifest(run: Path, command: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "manifest.json").write_text(f'{{"command": ["headlab", "{command}", "--out", "x"]}}')


def test_pruning_order_and_removable_claims_from_seeds_and_blocks(tmp_path, monkeypatch):
    f = _module()
    sec = f.sections
    monkeypatch.setattr(sec, "RUNS", tmp_path)
    _manifest(tmp_path / "prune-heads", "prune")
    rows = []
    curves = {("sweep", -1): [0.0, 0.05, 0.4, 0.9, 3.0],  # fractions 0.1, 0.3, 0.5, 0.7, 1
              ("random", 0): [0.3, 1.5, 3.0, 5.0, 7.0], ("random", 1): [0.4, 1.7, 3.2, 5.1, 7.0],
              ("random", 2): [0.2, 1.4, 2.9, 4.8, 7.0]}  # fmt: skip
    for (order, seed), curve in curves.items():
        for frac, d in zip((0.0, 0.1, 0.3, 0.5, 0.7, 1.0), [0.0, *curve], strict=True):
            rows.append({"order": order, "seed": seed, "method": "zero", "unit": "head",
                         "fraction": frac, "n_pruned": round(270 * frac), "metric": "ce",
                         "value": 4 + d, "baseline": 4.0, "delta": d, "effect": d,
                         "ranked_by": "sweep:zero/ce"})  # fmt: skip
    t = pd.DataFrame(rows)
    t.to_parquet(tmp_path / "prune-heads" / "results.parquet")
    sec_rem = pd.DataFrame({"order": ["random", "sweep"], "method": "zero", "metric": "ce",
                            "fraction": [0.0, 0.3], "n_pruned": [0, 81]})  # fmt: skip
    sec_rem.to_csv(tmp_path / "prune-heads" / "removable.csv", index=False)
    out = sec.render_prune_heads()
    v = {x.key: x.verdict for x in out.verdicts}
    assert v["order"] == "agrees"  # random is worse than the importance order on every seed
    assert v["removable"] == "inconclusive" and "no interval" in out.body  # one curve only
    # the per-block check gives the 70 % point its interval: 0.9 ± small over 32 blocks
    (tmp_path / "checks").mkdir()
    rng = np.random.default_rng(0)
    pd.DataFrame({"method": "zero", "fraction": 0.7, "block": range(32),
                  "delta": 0.9 + rng.normal(0, 0.3, 32)}).to_parquet(
        tmp_path / "checks" / "prune-heads-examples.parquet")  # fmt: skip
    out = sec.render_prune_heads()
    assert {x.key: x.verdict for x in out.verdicts}["removable"] == "disagrees"
    assert "t-interval over 32 evaluation blocks" in out.body


def test_shift_compare_and_attention_claims(tmp_path, monkeypatch):
    f = _module()
    sec = f.sections
    monkeypatch.setattr(sec, "RUNS", tmp_path)
    monkeypatch.setattr(sys.modules["findings_rule"], "N_BOOT", 200)
    # shift: zero triples the outlier rate in every group of blocks, the others do not
    _manifest(tmp_path / "shift", "shift")
    rows = []
    for m, rate, kl in (("zero", 0.034, 1.5), ("mean", 0.010, 0.8), ("resample", 0.013, 0.9)):
        rows += [{"method": m, "at_layer": 0, "metric": "norm_ratio", "value": 1.2,
                  "baseline": 1.0, "delta": 0.2},
                 {"method": m, "at_layer": 0, "metric": "frac_3sigma", "value": rate,
                  "baseline": 0.011, "delta": rate - 0.011},
                 {"method": m, "at_layer": 30, "metric": "kl", "value": kl, "baseline": 0.0,
                  "delta": kl},
                 {"method": m, "at_layer": 30, "metric": "ce", "value": 5.0, "baseline": 4.0,
                  "delta": 1.0}]  # fmt: skip
    pd.DataFrame(rows).to_parquet(tmp_path / "shift" / "results.parquet")
    assert sec.render_shift().verdicts[0].verdict == "inconclusive"  # no groups: no interval
    (tmp_path / "checks").mkdir()
    pd.DataFrame([{"group": g, "method": m, "kl": 1.0, "ratio": r + 0.1 * g}
                  for g in range(4) for m, r in (("zero", 3.0), ("mean", 0.9),
                                                  ("resample", 1.2))]).to_parquet(
        tmp_path / "checks" / "shift-groups.parquet")  # fmt: skip
    shift = sec.render_shift()
    assert shift.verdicts[0].verdict == "agrees" and "4 disjoint groups" in shift.body
    # compare: exact ablation agrees best with the others, rollout next, gradient least
    _manifest(tmp_path / "compare", "compare")
    rng = np.random.default_rng(2)
    truth = rng.gamma(1.0, 1.0, 40)
    noise = {"ablation:zero": 0.1, "atp:zero": 0.3, "rollout": 0.6, "gradient": 1.5,
             "attention": 0.8}  # fmt: skip
    rows = [{"measure": m, "metric": "ce", "example": e, "layer": h // 8, "head": h % 8,
             "value": truth[h] + rng.normal(0, sd), "weight": 10.0}
            for m, sd in noise.items() for e in range(32) for h in range(40)]  # fmt: skip
    pd.DataFrame(rows).to_parquet(tmp_path / "compare" / "per_example.parquet")
    pd.DataFrame(
        {
            "measure": ["rollout"],
            "reference": "ablation:zero",
            "spearman": 0.5,
            "ci_low": 0.4,
            "ci_high": 0.6,
            "topk_overlap": 0.3,
            "k": 10,
            "n_examples": 32,
        }
    ).to_csv(tmp_path / "compare" / "agreement.csv", index=False)
    comp = sec.render_compare()
    assert comp.verdicts[0].verdict == "agrees" and "bootstrap over 32 examples" in comp.body
    # attention: intervals of ρ wholly below 0.5 on both tasks
    for name in ("attention", "attention-induction"):
        _manifest(tmp_path / name, "attention")
        pd.DataFrame({"layer": [0, 1], "head": [0, 0], "plausibility": [0.9, 0.1],
                      "effect": [0.1, 2.0], "abs_effect": [0.1, 2.0]}).to_parquet(
            tmp_path / name / "results.parquet")  # fmt: skip
        pd.DataFrame({"metric": ["ce"], "method": "zero", "n_examples": 32, "keys": "answer",
                      "spearman": 0.2, "ci_low": 0.1, "ci_high": 0.3, "top_k": 10,
                      "top_k_overlap": 1, "chance_overlap": 0.37}).to_csv(
            tmp_path / name / "summary.csv", index=False)  # fmt: skip
    att = sec.render_attention()
    assert att.verdicts[0].verdict == "agrees" and "bootstrap over 32 examples" in att.body


def test_steering_inputs_are_held_out_and_the_gate_sets_differ_only_in_the_last_word():
    steer = _module("findings_steer")
    from headlab.analyses.steer.concepts import CONCEPTS, concept_rate

    for c in steer.CONCEPTS:
        prompts = steer.prompts(c)
        assert len(prompts) == len(set(prompts)) == 100
        assert concept_rate(prompts, CONCEPTS[c].words)[0] == 0.0  # no concept word in a prompt
        assert not set(prompts) & set(CONCEPTS[c].select_prompts)
        forget, keep = steer.gate_sentences(c, "concept"), steer.gate_sentences(c, "neutral")
        assert len(forget) == len(keep) == 720
        assert concept_rate(keep, CONCEPTS[c].words)[0] == 0.0
        assert concept_rate(forget, CONCEPTS[c].words)[0] > 0.1
        assert all(
            a.rsplit(" ", 1)[0] == b.rsplit(" ", 1)[0] for a, b in zip(forget, keep, strict=True)
        )


def _steer_tables(shift_remove: float, shift_amplify: float, cost: float, n: int = 40):
    """A steering run's generations and table: per-sample rates of the random sets ~ 0.1, the
    selected heads' shifted by the given amounts at alpha -1 and 5."""
    gen = np.random.default_rng(0)
    rows = []
    for p in range(n):
        for _ in range(3):
            for sel, seed in (("clean", None), ("selected", None), ("random", 0), ("random", 1)):
                for alpha in (1.0,) if sel == "clean" else (-1.0, 5.0):
                    shift = {-1.0: shift_remove, 5.0: shift_amplify}.get(alpha, 0.0)
                    rate = 0.1 + 0.02 * gen.standard_normal() + (shift if sel == "selected" else 0)
                    rows.append((sel, seed, alpha, f"prompt {p}", round(rate * 1000), 1000))
    gens = pd.DataFrame(rows, columns=["selection", "seed", "alpha", "prompt", "hits", "words"])
    table = pd.DataFrame(
        [("clean", 1.0, 0.0, 0.4), ("selected", -1.0, cost, 0.4), ("selected", 5.0, cost, 0.4)],
        columns=["selection", "alpha", "delta", "sd"],
    ).assign(target="python-docs", metric="ce", n=32)
    return gens, table


@pytest.mark.parametrize(
    ("remove", "amplify", "cost", "expected"),
    [(-0.05, 0.05, 0.05, "agrees"), (0.05, -0.05, 0.05, "disagrees"),
     (0.0, 0.0, 0.05, "inconclusive"), (-0.05, 0.05, 3.0, "disagrees")],
)  # fmt: skip
def test_steering_claims_pair_samples_across_conditions_and_require_a_small_cost(
    remove, amplify, cost, expected
):
    steer = _module("findings_steer")
    gens, table = _steer_tables(remove, amplify, cost)
    claims, verdict = steer.claims(gens, table)
    assert [c.side for c in claims] == ["<", "<", "<", ">", ">", "<"]
    assert verdict == expected
    assert claims[0].point == pytest.approx(remove, abs=0.01)  # against the random sets
    assert claims[1].point == pytest.approx(remove, abs=0.01)  # against the clean model
    assert claims[0].replicates.startswith("bootstrap over 40 prompts")


def test_steering_cost_check_pairs_blocks_and_narrows_the_cost_interval(tmp_path, monkeypatch):
    """The cost check rebuilds a steering run's corpus blocks, reproduces its mean ΔCE per α and
    stores the per-block differences, from which the cost claim gets a paired interval."""
    from tiny_folder import make_model_folder

    from headlab.cli.app import main

    checks, steer = _module("findings_checks"), _module("findings_steer")
    monkeypatch.setattr(checks, "RUNS", tmp_path)
    folder = str(make_model_folder(tmp_path / "tiny"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The value of the\nIt is used to\nA list of\n")
    assert main(["steer", "--model", folder, "--concept", "the,of,to,is", "--prompts",
                 str(prompts), "--alphas=-1,5", "--n-random", "1", "--max-new-tokens", "4",
                 "--k", "2", "--seq-len", "16", "--n-blocks", "5", "--off-task", "none",
                 "--quiet", "--out", str(tmp_path / "steer-x")]) == 0  # fmt: skip
    per = pd.read_parquet(checks.check_steer_cost("steer-x"))
    table = pd.read_parquet(tmp_path / "steer-x" / "results.parquet")
    sel = table[(table["selection"] == "selected") & (table["metric"] == "ce")]
    assert sorted(per["alpha"].unique()) == [-1.0, 5.0] and len(per) == 2 * 5
    for a, ref in zip(sel["alpha"], sel["delta"], strict=True):
        assert per[per["alpha"] == a]["delta"].mean() == pytest.approx(ref, abs=1e-4)
    # a cost of 0.4 ± 0.4 per condition is undecided unpaired; 0.4 ± 0.02 per block is decided
    gens, table = _steer_tables(-0.05, 0.05, 0.4)
    unpaired, _ = steer.claims(gens, table)
    blocks = pd.DataFrame([{"alpha": a, "block": b, "delta": 0.4 + 0.02 * (-1) ** b}
                           for a in (-1.0, 5.0) for b in range(32)])  # fmt: skip
    paired, verdict = steer.claims(gens, table, blocks)
    assert unpaired[2].verdict == "inconclusive" and paired[2].verdict == "agrees"
    assert paired[2].replicates == "t-interval over corpus blocks, paired"
    assert verdict == "agrees"


def test_steering_rates_are_the_runs_pooled_rates():
    """The claims count words as the run does (concept words / all words, pooled over samples),
    and a table whose rate differs from the generations' is refused."""
    steer = _module("findings_steer")
    texts = ["red and blue", "a green b c d e f"]
    gens = pd.DataFrame({"selection": ["clean", "clean"], "seed": [None, None], "alpha": 1.0,
                         "prompt": ["p", "p"], "text": texts})  # fmt: skip
    gens = steer.word_counts(gens, ["red", "blue", "green"])
    assert list(gens["hits"]) == [2, 1] and list(gens["words"]) == [3, 7]
    table = pd.DataFrame({"selection": ["clean"], "seed": [None], "alpha": [1.0],
                          "metric": ["concept_rate"], "value": [3 / 10]})  # fmt: skip
    steer._check_rates("x", gens, table)  # pooled 3/10, not the mean of 2/3 and 1/7
    with pytest.raises(SystemExit, match="concept rate"):
        steer._check_rates("x", gens, table.assign(value=(2 / 3 + 1 / 7) / 2))
