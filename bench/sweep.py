"""Benchmark (not a test): the all-head zero-ablation sweep with four tools, in one run.

(a) a plain PyTorch pre-hook loop, (b) an nnsight loop, (c) a TransformerLens ``TransformerBridge``
loop and (d) headlab's engine score the same sweep — every head of the default model zeroed alone,
cross-entropy over the same token blocks — and must agree. Also: a one-position task metric
(``names``, logit difference) with the plain loop against headlab; the cheap estimates (cost in
forward-pass equivalents, Spearman correlation with the exact sweep); and headlab's peak memory
against one clean forward plus the layer cache.

Each tool is a long-lived worker process (so its peak RSS is its own) that loads the model once;
the driver then hands the workers one layer's heads at a time, in rotating order, so that every
tool sees the same machine load (on a shared machine, sequential runs are not comparable).
Reported times are the sums over layers of wall and CPU seconds.

``--job-layer`` measures instead what the command line costs over the engine it drives: the full
``headlab sweep`` (zero ablation, every head) end to end against the engine alone on the same
tokens, its fixed cost (start-up, loading, manifest, figures: the same command on one head), and
``headlab --help``, alternating the runs so that both see the same load.

Run it with a Python that has the ``bench`` extra (``pip install -e '.[bench]'``); missing peers
are reported and skipped::

    python bench/sweep.py --n-blocks 4 --seq-len 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TOOLS = ("plain", "nnsight", "transformer-lens", "headlab", "headlab-nocache")
PROTOCOL = "@@"  # prefix of the lines a worker sends to the driver (libraries may print too)


# --- measurement helpers (inside a worker) -------------------------------------------------------


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _timed(fn: Callable[[], object]) -> tuple[object, dict[str, float]]:
    """Run ``fn`` once: wall and CPU seconds."""
    r0, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return out, {"wall": time.perf_counter() - wall, "cpu": cpu}


# --- the tools: each returns run(heads) -> values and finish() -> extra numbers ------------------


def _setup(spec: dict, load: bool = True):
    """torch, model (None with ``load=False``), tokenizer and the batch."""
    import torch
    from transformers import AutoTokenizer

    from headlab.data import load_task, load_texts, make_blocks
    from headlab.models.load import cache_dir, load_model

    torch.set_num_threads(spec["threads"])
    if load:
        model, tok = load_model("smollm2-135m")
    else:
        load_model("smollm2-135m")  # converts on first use; only the tokenizer is kept
        model, tok = None, AutoTokenizer.from_pretrained(cache_dir() / "models" / "smollm2-135m")
    if spec["task"]:
        batch = load_task("names", tok, n=spec["task_examples"], seed=0).eval
    else:
        batch, _ = make_blocks(
            tok, load_texts("python-docs"), seq_len=spec["seq_len"], n_blocks=spec["n_blocks"]
        )
    return torch, model, tok, batch


def _score(torch, logits, batch, task: bool) -> float:
    """Mean CE over next-token targets, or the mean logit difference at the answer."""
    if task:
        rows = torch.arange(logits.shape[0])
        lg = logits[rows, batch.answer_pos].float()
        return float((lg[rows, batch.correct] - lg[rows, batch.wrong]).mean())
    vocab = logits.shape[-1]
    ce = torch.nn.functional.cross_entropy(  # the usual flattened idiom
        logits[:, :-1].reshape(-1, vocab).float(),
        batch.input_ids[:, 1:].reshape(-1),
        reduction="none",
    )
    mask = batch.target_mask[:, 1:].reshape(-1).bool()
    return float(ce[mask].double().mean())


def _plain(spec: dict):
    torch, model, _, batch = _setup(spec)
    d = model.config.head_dim
    with torch.no_grad():
        model(**batch.model_inputs())  # warm-up

    def run(heads):
        out = []
        with torch.no_grad():
            for ly, h in heads:

                def hook(module, args, h=h):
                    x = args[0].clone()
                    x[..., h * d : (h + 1) * d] = 0
                    return (x, *args[1:])

                proj = model.model.layers[ly].self_attn.o_proj
                handle = proj.register_forward_pre_hook(hook)
                try:
                    logits = model(**batch.model_inputs()).logits
                finally:
                    handle.remove()
                out.append(_score(torch, logits, batch, spec["task"]))
        return out

    return run, dict


def _nnsight(spec: dict):
    torch, model, tok, batch = _setup(spec)
    import nnsight

    lm = nnsight.LanguageModel(model, tokenizer=tok)
    d = model.config.head_dim
    with torch.no_grad(), lm.trace(batch.input_ids):  # warm-up trace
        lm.output.logits.save()

    def run(heads):
        out = []
        with torch.no_grad():
            for ly, h in heads:
                with lm.trace(batch.input_ids):
                    lm.model.layers[ly].self_attn.o_proj.input[:, :, h * d : (h + 1) * d] = 0
                    logits = lm.output.logits.save()
                out.append(_score(torch, logits, batch, spec["task"]))
        return out

    return run, dict


def _transformer_lens(spec: dict):
    torch, _, tok, batch = _setup(spec, load=False)
    from transformer_lens.model_bridge import TransformerBridge

    from headlab.models.load import cache_dir

    bridge = TransformerBridge.boot_transformers(
        str(cache_dir() / "models" / "smollm2-135m"), device="cpu", tokenizer=tok
    )
    with torch.no_grad():
        bridge(batch.input_ids)  # warm-up

    def run(heads):
        out = []
        with torch.no_grad():
            for ly, h in heads:

                def hook(act, hook, h=h):
                    act[:, :, h] = 0  # [batch, pos, head, d_head]
                    return act

                logits = bridge.run_with_hooks(
                    batch.input_ids, fwd_hooks=[(f"blocks.{ly}.attn.hook_z", hook)]
                )
                out.append(_score(torch, logits, batch, spec["task"]))
        return out

    return run, dict


def _headlab(spec: dict, *, cache: bool = True):
    """headlab's engine. One layer per request, as ``sweep()`` asks; with ``cache`` the clean
    pass is shared by every request (``CleanCache``), without it each request runs its own."""
    torch, model, _, batch = _setup(spec)
    import headlab as hl
    from headlab.engine import CleanCache, run_plans

    metric = "logit_diff" if spec["task"] else "ce"
    # memory goal: peak RSS over the loaded model of one clean forward, then of the sweep
    base = _status_kb("VmRSS") / 1024
    _reset_peak()
    with torch.no_grad():
        model(**batch.model_inputs())  # also the warm-up
    clean_peak = _status_kb("VmHWM") / 1024 - base
    shared = CleanCache() if cache else None
    options = {"batch_size": spec["batch_size"], "max_batch_tokens": spec["max_batch_tokens"]}

    def run(heads):
        plans = [hl.Plan.of({(ly, h): hl.Zero()}) for ly, h in heads]
        results = run_plans(model, batch, plans, [metric], cache=shared, **options)
        return [r[metric].mean for r in results]

    def finish() -> dict:
        out = {
            "rss_peak_mb": _status_kb("VmHWM") / 1024,  # the sweep's, before the estimates
            "rss_load_mb": base,
            "clean_peak_mb": clean_peak,
            "sweep_peak_mb": _status_kb("VmHWM") / 1024 - base,
            "cache_mb": model.config.num_hidden_layers
            * batch.input_ids.numel()
            * model.config.hidden_size
            * 4
            / 2**20,
            "clean_value": run_plans(model, batch, [hl.Plan()], [metric], cache=shared, **options)[
                0
            ][metric].mean,
        }
        if cache and not spec["task"]:
            out.update(_estimates(spec, torch, model, batch))
        return out

    return run, finish


def _estimates(spec: dict, torch, model, batch) -> dict:
    from headlab.analyses.estimate import estimate

    def forward():
        with torch.no_grad():
            model(**batch.model_inputs())

    out: dict = {}
    for label, methods in (("atp+gradient", ["atp:zero", "gradient"]), ("rollout", ["rollout"])):
        # interleave clean forwards with the estimate, so both see the same load
        fwd, est = [], []
        for _ in range(3):
            fwd.append(_timed(forward)[1]["wall"])
            table, t = _timed(
                lambda methods=methods: estimate(
                    model, batch, methods=methods, batch_size=spec["batch_size"]
                )
            )
            est.append(t["wall"])
        out[f"est_{label}_wall"] = min(est)
        out[f"est_{label}_fpe"] = min(est) / min(fwd)
        out["forward_wall"] = min(fwd)
        for method in methods:
            rows = table[table["method"] == method].set_index(["layer", "head"])["effect"]
            out[f"effect_{method}"] = {f"{ly}.{h}": float(v) for (ly, h), v in rows.items()}
    return out


RUNNERS = {
    "plain": _plain,
    "nnsight": _nnsight,
    "transformer-lens": _transformer_lens,
    "headlab": _headlab,
    "headlab-nocache": lambda spec: _headlab(spec, cache=False),
}


def _send(obj: dict) -> None:
    print(PROTOCOL + json.dumps(obj), flush=True)


def _serve(tool: str, spec: dict) -> None:
    """Worker loop: load, report ready, then answer ``run`` requests until ``finish``."""
    run, finish = RUNNERS[tool](spec)
    _send({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "run":
            values, t = _timed(lambda cmd=cmd: run([tuple(h) for h in cmd["heads"]]))
            _send({"values": values, **t})
        else:
            extra = finish()
            _send({"rss_peak_mb": _status_kb("VmHWM") / 1024, **extra})
            return


# --- the driver ----------------------------------------------------------------------------------


class _Worker:
    def __init__(self, tool: str, spec: dict) -> None:
        self.tool = tool
        cmd = [sys.executable, __file__, "--serve", tool, "--spec", json.dumps(spec)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        # stderr to a file: a pipe could fill up and block the worker
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the worker)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        self.error: str | None = None
        self.total = {"wall": 0.0, "cpu": 0.0}
        self.values: list[float] = []

    def receive(self) -> dict | None:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])
        self.proc.wait()
        self.stderr.seek(0)
        err = self.stderr.read().strip().splitlines()
        self.error = " | ".join(err[-2:]) or f"exited with {self.proc.wait()}"
        return None

    def request(self, cmd: dict) -> dict | None:
        if self.error:
            return None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.receive()


def _interleaved(tools: list[str], spec: dict, layers: list[int]) -> list[dict]:
    workers = [_Worker(t, spec) for t in tools]
    for w in workers:
        w.receive()  # ready (or the error)
    live = [w for w in workers if not w.error]
    for i, ly in enumerate(layers):
        heads = [[ly, h] for h in range(9)]
        for w in live[i % len(live) :] + live[: i % len(live)]:
            got = w.request({"op": "run", "heads": heads})
            if got is None:
                continue
            w.total["wall"] += got["wall"]
            w.total["cpu"] += got["cpu"]
            w.values.extend(got["values"])
        print(f"  layer {ly} done", file=sys.stderr, flush=True)
    results = []
    for w in workers:
        if w.error:
            results.append({"tool": w.tool, "error": w.error})
            continue
        final = w.request({"op": "finish"}) or {}
        w.proc.wait()
        if w.error:
            results.append({"tool": w.tool, "error": w.error})
            continue
        results.append({"tool": w.tool, "values": w.values, **w.total, **final})
    return results


def _table(results: list[dict]) -> list[str]:
    ok = {r["tool"]: r for r in results if "error" not in r}
    base, plain = ok.get("headlab"), ok.get("plain")
    out = [
        f"{'tool':<17}{'wall s':>8}{'CPU s':>8}{'wall/headlab':>13}{'CPU/headlab':>12}"
        f"{'peak RSS MiB':>13}{'max |diff|':>11}"
    ]
    for r in results:
        if "error" in r:
            out.append(f"{r['tool']:<17}  skipped: {r['error'][:100]}")
            continue
        nan = float("nan")
        wall = r["wall"] / base["wall"] if base else nan
        cpu = r["cpu"] / base["cpu"] if base else nan
        diff = (
            max(abs(a - b) for a, b in zip(r["values"], plain["values"], strict=True))
            if plain
            else nan
        )
        out.append(
            f"{r['tool']:<17}{r['wall']:>8.1f}{r['cpu']:>8.1f}{wall:>13.2f}{cpu:>12.2f}"
            f"{r['rss_peak_mb']:>13.0f}{diff:>11.1e}"
        )
    return out


def _summary(hl: dict, layers: list[int]) -> list[str]:
    from headlab.analyses.ranking import spearman

    grow, allowed = hl["sweep_peak_mb"], hl["clean_peak_mb"] + hl["cache_mb"]
    lines = [
        f"memory (RSS over the loaded model, {hl['rss_load_mb']:.0f} MiB): one clean forward "
        f"+{hl['clean_peak_mb']:.0f} MiB, layer cache {hl['cache_mb']:.1f} MiB; the sweep "
        f"(clean forward included) +{grow:.0f} MiB -> {grow / allowed:.2f}x (goal <= 1.5x)",
        f"estimates, all {30 * 9} heads (one clean forward = {hl['forward_wall']:.2f} s):",
    ]
    heads = [f"{ly}.{h}" for ly in layers for h in range(9)]
    exact = [abs(v - hl["clean_value"]) for v in hl["values"]]
    for label, methods in (("atp+gradient", ["atp:zero", "gradient"]), ("rollout", ["rollout"])):
        lines.append(
            f"  {label:<13} {hl[f'est_{label}_wall']:.2f} s = "
            f"{hl[f'est_{label}_fpe']:.2f} forward-pass equivalents"
        )
        for m in methods:
            est = [abs(hl[f"effect_{m}"][k]) for k in heads]
            rho = spearman(est, exact)
            lines.append(f"    {m:<9} Spearman with exact zero-ablation |delta CE|: {rho:.3f}")
    return lines


def _engine_alone(spec: dict) -> None:
    """Worker: the engine on a finished CLI run's own tokens (every head, zero ablation, the
    clean runs shared by all layers, as the sweep job does); prints its wall seconds."""
    import torch

    import headlab as hl
    from headlab.engine import CleanCache, run_plans
    from headlab.runs import RunDir

    torch.set_num_threads(spec["threads"])
    model, _ = hl.load_model("smollm2-135m")
    batch = RunDir(Path(spec["run"]), {}).load_tokens()
    layout = hl.describe(model)
    cache = CleanCache()
    start = time.perf_counter()
    run_plans(model, batch, [hl.Plan()], ["ce"], cache=cache, batch_size=spec["batch_size"])
    for ly in range(layout.n_layers):
        plans = [hl.Plan.of({(ly, h): hl.Zero()}) for h in range(layout.n_heads)]
        run_plans(model, batch, plans, ["ce"], cache=cache, batch_size=spec["batch_size"])
    _send({"wall": time.perf_counter() - start})


def _wall(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _job_layer(args: argparse.Namespace) -> None:
    """``headlab sweep`` end to end vs the engine alone on the same tokens, ``--repeats`` times
    alternated; its fixed cost; ``headlab --help``."""
    import statistics

    exe = str(Path(sys.executable).with_name("headlab"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    data = ["--data", "python-docs", "--seq-len", str(args.seq_len), "--n-blocks",
            str(args.n_blocks), "--batch-size", str(args.n_blocks), "--method", "zero",
            "--quiet", "--force"]  # fmt: skip
    helps = [_wall([exe, "--help"], env) for _ in range(5)]
    cmd_helps = [_wall([exe, "sweep", "--help"], env) for _ in range(5)]
    print(f"headlab --help: median {statistics.median(helps):.3f} s; headlab sweep --help: "
          f"median {statistics.median(cmd_helps):.3f} s (goal < 0.5 s)")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = str(Path(tmp) / "run")
        for i in range(args.repeats):
            one = _wall([exe, "sweep", *data, "--heads", "0.0", "--out", run + "-one"], env)
            cli = _wall([exe, "sweep", *data, "--out", run], env)
            spec = {"run": run, "threads": args.threads, "batch_size": args.n_blocks}
            out = subprocess.run(
                [sys.executable, __file__, "--serve", "engine", "--spec", json.dumps(spec)],
                check=True, capture_output=True, text=True, env=env,
            ).stdout  # fmt: skip
            engine = json.loads(
                next(ln[len(PROTOCOL) :] for ln in out.splitlines() if ln.startswith(PROTOCOL))
            )["wall"]
            rows.append((cli, engine, one))
            print(f"  repeat {i + 1}: headlab sweep {cli:.1f} s, engine alone {engine:.1f} s, "
                  f"one-head command {one:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    cli, engine, one = (statistics.median(c) for c in zip(*rows, strict=True))
    print(f"full sweep of 270 heads, zero ablation, CE on {args.n_blocks} x {args.seq_len} "
          f"python-docs tokens (medians of {args.repeats}):")  # fmt: skip
    print(f"  headlab sweep (CLI, end to end)  {cli:8.1f} s")
    print(f"  engine alone (same tokens)       {engine:8.1f} s")
    print(f"  CLI / engine                     {cli / engine:8.3f}  (goal <= 1.10)")
    print(f"  fixed cost of a command (one-head sweep, end to end) {one:.1f} s (goal < 3 s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-blocks", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--task-examples", type=int, default=16, help="names prompts (one-position)")
    p.add_argument("--layers", default="all", help="'all' or a comma list, e.g. 0,15,29")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--batch-size", type=int, default=None, help="headlab sub-batch (default: all examples)"
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="headlab: stack plans up to this many tokens per forward (default: one plan)",
    )
    p.add_argument("--skip-task", action="store_true")
    p.add_argument("--json", default=None, help="also write every number here")
    p.add_argument("--job-layer", action="store_true", help="CLI vs engine (see above)")
    p.add_argument("--repeats", type=int, default=3, help="--job-layer: alternated repeats")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve == "engine":
        _engine_alone(json.loads(args.spec))
        return 0
    if args.serve:
        _serve(args.serve, json.loads(args.spec))
        return 0
    if args.job_layer:
        import torch

        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
              f"({args.threads} threads), python {platform.python_version()}; load average "
              f"{os.getloadavg()[0]:.1f}")  # fmt: skip
        _job_layer(args)
        print(f"load average at end {os.getloadavg()[0]:.1f}")
        return 0

    import torch

    layers = list(range(30)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    spec = {
        "n_blocks": args.n_blocks,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "batch_size": args.batch_size or max(args.n_blocks, args.task_examples),
        "task_examples": args.task_examples,
        "max_batch_tokens": args.max_batch_tokens,
        "task": False,
    }
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({args.threads} threads), python {platform.python_version()}; "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    print(
        f"sweep: SmolLM2-135M, zero ablation of {len(layers) * 9} heads one at a time, "
        f"cross-entropy on {args.n_blocks} x {args.seq_len} python-docs tokens"
    )
    results = _interleaved(args.tools.split(","), spec, layers)
    print("\n".join(_table(results)))
    report: dict = {"sweep": results}
    hl = next((r for r in results if r["tool"] == "headlab" and "error" not in r), None)
    if hl and "est_rollout_wall" in hl:
        print("\n".join(_summary(hl, layers)))
    if not args.skip_task:
        print(
            f"one-position metric: names task, logit difference at the answer, "
            f"{args.task_examples} prompts"
        )
        task = _interleaved(["plain", "headlab"], {**spec, "task": True}, layers)
        print("\n".join(_table(task)))
        report["task"] = task
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
