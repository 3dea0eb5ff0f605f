"""Options shared by several commands, and their conversion to job arguments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from headlab.defaults import DEFAULT_BINS, DEFAULT_MODEL, DEFAULT_N_STATS_BLOCKS, DEVICE_MAPS
from headlab.memory import parse_max_memory

if TYPE_CHECKING:
    from headlab.models.layout import Layout


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="ID_OR_PATH",
        help="a named model: 'smollm2-135m' (the default, a decoder), 'minilm' "
        "(all-MiniLM-L6-v2, a BERT sentence encoder without an LM head, scored by embed_cos), "
        "'digits-vit' (a small ViT trained here on scikit-learn's 8x8 digits, on first use; "
        "reads --data digits, scored by cls_ce and cls_acc); or a local Hugging Face folder, or "
        "a hub id that is cached (or reachable online)",
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="weights and activations dtype",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the Python code a model folder ships (config.json auto_map) when transformers "
        "has no built-in class for it; only for code you trust (recorded in the manifest)",
    )
    g.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickled pytorch_model.bin weights when the folder has no safetensors file "
        "(unpickling can run code; converting to safetensors is safer)",
    )
    g.add_argument(
        "--device-map",
        default=None,
        choices=DEVICE_MAPS,
        help="spread a model too large for one device over the GPUs, the CPU and (with "
        "--offload-folder) the disk, with accelerate; same numbers as unsplit. Without a GPU, "
        "auto keeps the model on the CPU. Not with --device",
    )
    g.add_argument(
        "--max-memory",
        type=max_memory_arg,
        default=None,
        metavar="DEV=SIZE,...",
        help="what each device may hold with --device-map, e.g. cpu=2GiB,0=10GiB (devices: cpu, "
        "mps, a GPU index or cuda:N; sizes: bytes or KB/MB/GB/TB, KiB/MiB/GiB/TiB); devices "
        "not named get nothing (default: what is free)",
    )
    g.add_argument(
        "--offload-folder",
        default=None,
        metavar="DIR",
        help="with --device-map: allow disk offload, reading what fits nowhere else from disk "
        "before each module runs (exact, but slow); without it a model that does not fit is "
        "refused before any work",
    )


def max_memory_arg(text: str) -> dict[int | str, int]:
    """The argparse ``type`` of ``--max-memory``: ``"cpu=2GiB,0=10GiB"`` -> bytes per device (a
    malformed value is a usage error)."""
    try:
        return parse_max_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_data_args(
    p: argparse.ArgumentParser, *, default_data: str | None = "python-docs", n_blocks: int = 8
) -> None:
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group()
    src.add_argument(
        "--data",
        default=default_data,
        metavar="NAME_OR_PATH",
        help="built-in corpus (python-docs, austen), a text file, a folder of text "
        "files, a .jsonl file, or a saved Hugging Face dataset folder; for --model digits-vit: "
        "digits (its default: held-out images to evaluate, training images for statistics)",
    )
    src.add_argument(
        "--task",
        default=None,
        metavar="NAME",
        help="built-in task instead of a corpus: induction, names, capitals "
        "(each brings its metric and loss mask)",
    )
    g.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text")
    g.add_argument(
        "--seq-len",
        type=positive_int("--seq-len"),
        default=None,
        help="tokens per block (corpora: default 128; induction: default 65)",
    )
    g.add_argument(
        "--n-blocks",
        type=positive_int("--n-blocks"),
        default=n_blocks,
        help="evaluation blocks (or task examples, or images)",
    )
    g.add_argument(
        "--n-stats-blocks",
        type=positive_int("--n-stats-blocks"),
        default=DEFAULT_N_STATS_BLOCKS,
        help="blocks (or images) for activation statistics, disjoint from evaluation",
    )
    g.add_argument(
        "--stats-data",
        default=None,
        metavar="NAME_OR_PATH",
        help="collect statistics on this corpus instead of the data's own split",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for block choice and sampling")


#: what ``--counterfactual`` reads, shown in the help of every command that takes it
COUNTERFACTUAL_FORMAT = (
    "Patching (method patch, atp:patch) replaces each head's output by its output on a "
    "position-aligned counterfactual input. --counterfactual FILE.jsonl: one pair per line, "
    '{"clean": "When Mary and John went to the store, John gave a drink to", '
    '"corrupted": "When Amy and Lisa went to the store, Tom gave a drink to", '
    '"answer": " Mary", "wrong": " John"}; clean and corrupted of equal token length; answer '
    "and the optional wrong one token each as written (mind the leading space); with wrong "
    "on every line the metric is logit_diff, else answer_logprob. The clean sides are the "
    "examples (every pair; --n-blocks does not apply), the corrupted sides also the statistics "
    "inputs unless --stats-data. --counterfactual builtin (the default with --task names or "
    "capitals when a method patches): each example's minimal pair (names: the same template "
    "with three other names, the ABC counterfactual; capitals: another country). Saved in "
    "the run directory as counterfactual.safetensors."
)


def add_counterfactual_args(p: argparse.ArgumentParser, *, extra: str = "") -> None:
    """``--counterfactual FILE|builtin`` (its own help group, documenting the pairs format);
    :func:`data_kwargs` passes it on. ``extra``: what it means for this command."""
    g = p.add_argument_group("counterfactual pairs", COUNTERFACTUAL_FORMAT + extra)
    g.add_argument(
        "--counterfactual",
        default=None,
        metavar="FILE|builtin",
        help="clean/corrupted pairs (JSONL, format above) or 'builtin' (--task names, capitals)",
    )


def add_run_args(p: argparse.ArgumentParser, *, default_out: str | None = None) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--out",
        default=default_out,
        required=default_out is None,
        metavar="DIR",
        help="run directory (re-running the same command resumes it)",
    )
    g.add_argument(
        "--force", action="store_true", help="overwrite --out even if it holds a different run"
    )
    g.add_argument(
        "--batch-size",
        type=positive_int("--batch-size"),
        default=8,
        help="examples per forward pass",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    g.add_argument(
        "--report",
        action="store_true",
        help="also write the head atlas of this run, <out>/atlas.html (see headlab report)",
    )


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """Where the parts run: ``--executor``, ``--ray-address``, ``--workers``,
    ``--gpus-per-worker`` (not part of the run's identity: a run resumes on either executor)."""
    g = p.add_argument_group("executor (where the parts run; the results are the same)")
    g.add_argument(
        "--executor",
        default="serial",
        choices=["serial", "ray"],
        help="serial: in this process (default); ray: on Ray workers, each loading the model "
        "once (needs pip install 'headlab[ray]')",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join: HOST:PORT of its head node, or 'auto' (the cluster `ray start` "
        "runs on this node); default: start a local cluster for this run",
    )
    g.add_argument(
        "--workers",
        type=positive_int("--workers"),
        default=None,
        metavar="N",
        help="Ray workers (default: one per GPU with --gpus-per-worker 1, else one per T CPUs of "
        "the cluster, T = torch threads of this process, which every worker uses too)",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=non_negative_float("--gpus-per-worker"),
        default=0.0,
        metavar="F",
        help="GPUs each Ray worker reserves (1: one worker per GPU, with --device cuda; "
        "default 0: CPU workers)",
    )


def executor_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return {
        "executor": args.executor,
        "ray_address": args.ray_address,
        "workers": args.workers,
        "gpus_per_worker": args.gpus_per_worker,
    }


def job_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """What every job twin takes from the run and executor options: ``out``, ``batch_size``,
    ``force``, the executor's settings, ``progress`` (off with ``--quiet``), ``on_status`` and
    the ``command`` line its manifest records."""
    from headlab.jobs.base import command_line

    return {
        "out": args.out,
        "batch_size": args.batch_size,
        "force": args.force,
        **executor_kwargs(args),
        "progress": not args.quiet,
        "on_status": status(args),
        "command": command_line(),
    }


def non_negative_float(option: str) -> Callable[[str], float]:
    """An argparse ``type`` for a number >= 0 (``--gpus-per-worker``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{option} must be a number >= 0, got {text}")
        return value

    parse.__name__ = "a number >= 0"
    return parse


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_at_least(option: str, low: int, words: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{option} must be {words}, got {text}")
        return value

    parse.__name__ = words  # argparse names the type in some messages
    return parse


def positive_int(option: str) -> Callable[[str], int]:
    """An argparse ``type`` for a count: ``"--batch-size must be a positive integer, got 0"``."""
    return _int_at_least(option, 1, "a positive integer")


def non_negative_int(option: str) -> Callable[[str], int]:
    """An argparse ``type`` for a count that may be 0 (``--reservoir``, ``--n-random``)."""
    return _int_at_least(option, 0, "a non-negative integer")


def parse_heads(
    text: str | Sequence[tuple[int, int]] | None, layout: Layout | None = None
) -> list[tuple[int, int]] | None:
    """``"3.5,4.0"`` or ``"3:5,4:0"`` -> [(3, 5), (4, 0)]: the argparse ``type`` of ``--heads``
    (so a bad value is a usage error before any work); an already parsed list is returned as is.
    Empty, malformed, negative or repeated heads are refused; with ``layout`` (once the model is
    loaded, before any run directory) so are heads the model does not have, as a ConfigError. Both
    checks are :func:`headlab.analyses.sweep.check_heads`, the one the Python API uses."""
    if text is None:
        return None
    heads = _heads_from_text(text) if isinstance(text, str) else list(text)
    if layout is None:
        return heads
    from headlab.heads import check_heads

    return check_heads(heads, layout)


def _heads_from_text(text: str) -> list[tuple[int, int]]:
    from headlab.errors import ConfigError
    from headlab.heads import parse_heads as parse

    try:
        return parse(text)
    except ConfigError as err:  # argparse reports it as a usage error, before any work
        raise argparse.ArgumentTypeError(str(err)) from None


def data_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The job keywords of the model and data options (and ``--counterfactual`` where the
    command takes it)."""
    extra = {"counterfactual": args.counterfactual} if hasattr(args, "counterfactual") else {}
    return {
        **extra,
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "data": None if args.task else args.data,
        "task": args.task,
        "text_field": args.text_field,
        "seq_len": args.seq_len,
        "n_blocks": args.n_blocks,
        "n_stats_blocks": args.n_stats_blocks,
        "stats_data": args.stats_data,
        "seed": args.seed,
        "trust_remote_code": args.trust_remote_code,
        "allow_pickle": args.allow_pickle,
        "device_map": args.device_map,
        "max_memory": args.max_memory,
        "offload_folder": args.offload_folder,
    }


def status(args: argparse.Namespace):
    if getattr(args, "quiet", False):
        return None
    return lambda msg: print(f"headlab: {msg}", file=sys.stderr, flush=True)


def float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def add_stats_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("statistics")
    g.add_argument(
        "--bins", type=positive_int("--bins"), default=DEFAULT_BINS, help="histogram bins for peak"
    )
    g.add_argument(
        "--reservoir",
        type=non_negative_int("--reservoir"),
        default=16,
        help="donor inputs for resample",
    )
