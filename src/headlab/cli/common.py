"""Options shared by several commands, and their conversion to job arguments."""

from __future__ import annotations

import argparse
import sys

from headlab.models.load import DEFAULT_MODEL


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="ID_OR_PATH",
        help="'smollm2-135m' (embedded default), a local Hugging Face folder, or a hub "
        "id that is cached (or reachable online)",
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="weights and activations dtype",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")


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
        "files, a .jsonl file, or a saved Hugging Face dataset folder",
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
        type=int,
        default=None,
        help="tokens per block (corpora: default 128; induction: default 65)",
    )
    g.add_argument(
        "--n-blocks", type=int, default=n_blocks, help="evaluation blocks (or task examples)"
    )
    g.add_argument(
        "--n-stats-blocks",
        type=int,
        default=16,
        help="blocks for activation statistics, disjoint from evaluation",
    )
    g.add_argument(
        "--stats-data",
        default=None,
        metavar="NAME_OR_PATH",
        help="collect statistics on this corpus instead of the data's own split",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for block choice and sampling")


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
    g.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    g.add_argument("--quiet", action="store_true", help="no progress bars or status lines")


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_heads(text: str | None) -> list[tuple[int, int]] | None:
    """``"3.5,4.0"`` or ``"3:5,4:0"`` -> [(3, 5), (4, 0)]."""
    if text is None:
        return None
    out = []
    for item in csv_list(text):
        sep = "." if "." in item else ":"
        try:
            layer, head = (int(x) for x in item.split(sep))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--heads takes LAYER.HEAD pairs separated by commas (e.g. 3.5,10.1), got {item!r}"
            ) from None
        out.append((layer, head))
    return out


def data_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return {
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
    }


def status(args: argparse.Namespace):
    if getattr(args, "quiet", False):
        return None
    return lambda msg: print(f"headlab: {msg}", file=sys.stderr, flush=True)
