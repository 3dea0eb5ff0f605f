"""Executors: where a job's parts run — in this process (:class:`SerialExecutor`, the default) or
on the workers of a Ray cluster (:class:`RayExecutor`).

An executor is given the parts still to do and the :class:`~headlab.parts.Context` they read, and
yields ``(part, output)`` as each part finishes (in any order). The driver,
:func:`headlab.jobs.base.execute`, saves each output as it arrives and keeps the progress bar, so a
run interrupted anywhere resumes with either executor and ends with the same run directory.

On Ray, each worker is an actor that loads the model once from the context's
:class:`~headlab.parts.ModelSpec` (never pickled weights), with this process's torch settings
(threads, matmul precision, TF32 and determinism flags), so its numbers equal the serial ones. The
context's batches and statistics go through Ray's object store once per :func:`execute` call; each
worker keeps its own clean-run caches. A worker killed in the middle of a part is restarted and the
part retried (``retries`` times); a worker that cannot load the model fails with an error naming
its node and the model's path.

Ray is an optional extra (``pip install 'headlab[ray]'``), imported only here and only when a
:class:`RayExecutor` is made.
"""

from __future__ import annotations

import logging
import math
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from headlab.errors import ConfigError, HeadlabError, check_count
from headlab.parts import Context, ModelSpec, OnForward, Part

if TYPE_CHECKING:
    from headlab.batch import Batch
    from headlab.stats import Stats

__all__ = ["EXECUTORS", "Executor", "RayExecutor", "SerialExecutor", "make_executor"]

#: the names ``--executor`` takes
EXECUTORS = ("serial", "ray")

#: what to do when Ray is missing
RAY_EXTRA = "pip install 'headlab[ray]'"


class Executor:
    """Runs parts and yields ``(part, output)`` as each finishes; a context manager whose exit
    releases what it started (workers, a local cluster)."""

    def run(
        self, parts: Sequence[Part], ctx: Context, on_forward: OnForward | None = None
    ) -> Iterator[tuple[Part, Any]]:
        """Run ``parts`` on ``ctx``; ``on_forward`` advances a progress bar (by the examples of
        each forward in this process, by a part's ``cost`` when it finishes elsewhere)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release workers and clusters this executor started (it may be used again after)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialExecutor(Executor):
    """Every part in this process, one after another, in order (the default)."""

    def run(
        self, parts: Sequence[Part], ctx: Context, on_forward: OnForward | None = None
    ) -> Iterator[tuple[Part, Any]]:
        for part in parts:
            yield part, part.run(ctx, on_forward)


class _Borrowed(Executor):
    """An executor the caller made and closes: a job uses it and leaves it open."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    def run(
        self, parts: Sequence[Part], ctx: Context, on_forward: OnForward | None = None
    ) -> Iterator[tuple[Part, Any]]:
        return self.inner.run(parts, ctx, on_forward)


def make_executor(
    executor: str | Executor = "serial",
    *,
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
) -> Executor:
    """The executor of a job's ``executor=`` option (``--executor``), checked before any work.

    ``"serial"`` or ``"ray"`` (with ``ray_address``, ``workers``, ``gpus_per_worker``: see
    :class:`RayExecutor`) make one the job closes when it ends; an :class:`Executor` value is used
    as it is and left open for its owner to close (the Ray options are then refused: set them on
    the value).
    """
    ray_options = ray_address is not None or workers is not None or gpus_per_worker != 0
    if isinstance(executor, Executor):
        if ray_options:
            raise ConfigError(
                "ray_address, workers and gpus_per_worker go to RayExecutor(...) when an "
                "Executor value is given as executor="
            )
        return _Borrowed(executor)
    if executor == "serial":
        if ray_options:
            raise ConfigError("--ray-address, --workers and --gpus-per-worker need --executor ray")
        return SerialExecutor()
    if executor == "ray":
        return RayExecutor(ray_address, workers, gpus_per_worker)
    raise ConfigError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")


# --- Ray -----------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, an optional extra: {RAY_EXTRA}") from None
    return ray


def _probe(address: str, timeout: float) -> None:
    """Refuse, within ``timeout`` seconds, a ``HOST:PORT`` nobody answers on (``ray.init`` would
    retry for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"--ray-address {address!r} is not HOST:PORT (the head node's address, e.g. "
            "10.0.0.1:6379), 'auto' (the cluster `ray start` runs on this node) or omitted (a "
            "local cluster started for this run)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(
            f"cannot reach the Ray cluster at --ray-address {address} ({err}); start it with "
            "`ray start --head` on that node, check the host and the port (6379 unless `ray start "
            "--port` said otherwise), or omit --ray-address to start a local cluster"
        ) from None


@dataclass(frozen=True)
class TorchSettings:
    """The torch settings that can change a forward's numbers, copied from the driver to every
    worker (a Ray worker would otherwise run one thread, which changes how reductions split)."""

    threads: int
    interop_threads: int
    matmul_precision: str
    deterministic: bool
    deterministic_warn_only: bool
    cuda_tf32: bool
    cuda_fp16_reduced: bool
    cuda_bf16_reduced: bool
    cudnn_tf32: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool

    @classmethod
    def here(cls) -> TorchSettings:
        import torch

        cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        return cls(
            torch.get_num_threads(), torch.get_num_interop_threads(),
            torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            cuda.allow_tf32, cuda.allow_fp16_reduced_precision_reduction,
            cuda.allow_bf16_reduced_precision_reduction, cudnn.allow_tf32, cudnn.deterministic,
            cudnn.benchmark,
        )  # fmt: skip

    def apply(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        with suppress(RuntimeError):  # only before any inter-op work (a fresh worker has none)
            torch.set_num_interop_threads(self.interop_threads)
        torch.set_float32_matmul_precision(self.matmul_precision)
        torch.use_deterministic_algorithms(
            self.deterministic, warn_only=self.deterministic_warn_only
        )
        cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        cuda.allow_tf32 = self.cuda_tf32
        cuda.allow_fp16_reduced_precision_reduction = self.cuda_fp16_reduced
        cuda.allow_bf16_reduced_precision_reduction = self.cuda_bf16_reduced
        cudnn.allow_tf32, cudnn.deterministic = self.cudnn_tf32, self.cudnn_deterministic
        cudnn.benchmark = self.cudnn_benchmark


@dataclass(frozen=True)
class _Shipped:
    """What a worker receives of a context (the rest it loads from the spec)."""

    batch: Batch
    stats: Stats | None
    batch_size: int
    batches: dict[str, Batch]
    tokenizer: bool

    @classmethod
    def of(cls, ctx: Context) -> _Shipped:
        return cls(
            ctx.batch, ctx.stats, ctx.batch_size, dict(ctx.batches), ctx.tokenizer is not None
        )


@dataclass(frozen=True)
class _Failed:
    """A headlab error a part raised on a worker, re-raised as is by the driver."""

    error: HeadlabError


class _Worker:
    """One Ray actor: loads the model once from the spec, then runs parts on the context it is
    sent (rebuilt once per :func:`execute` call, with its own clean-run caches)."""

    def __init__(self, spec: ModelSpec, settings: TorchSettings) -> None:
        import ray

        self.node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
        self.error: str | None = None
        self.spec = spec
        self._shipped: str | None = None
        self._ctx: Context | None = None
        try:
            settings.apply()
            device = spec.device
            if ray.get_gpu_ids() and device.startswith("cuda"):
                device = "cuda"  # Ray shows this worker its own GPUs only, from cuda:0
            self.model, self.tokenizer = spec.load(device)
            from headlab.models.layout import describe

            self.layout = describe(self.model)
        except Exception as err:  # reported by ready(), with the node, instead of a dead actor
            self.error = f"{type(err).__name__}: {err}"

    def ready(self) -> tuple[str, str | None]:
        """``(node, None)``, or ``(node, why the model did not load)``."""
        return self.node, self.error

    def run(self, part: Part, shipped: list[Any]) -> Any:
        import ray

        ref = shipped[0]  # in a list, so Ray hands over the reference, fetched once per context
        if ref.hex() != self._shipped:
            self._ctx = None  # free the previous context first
            data: _Shipped = ray.get(ref)
            self._ctx = Context(
                self.model, self.layout, data.batch, data.stats, data.batch_size, data.batches,
                tokenizer=self.tokenizer if data.tokenizer else None, spec=self.spec,
            )  # fmt: skip
            self._shipped = ref.hex()
        assert self._ctx is not None
        try:
            return part.run(self._ctx, None)
        except HeadlabError as err:
            return _Failed(err)


class RayExecutor(Executor):
    """Parts on the workers of a Ray cluster, one actor per worker, each loading the model once.

    Args:
        address: ``None`` starts a new local cluster for the job, shut down when it ends;
            ``"auto"`` joins the cluster ``ray start`` runs on this node; ``HOST:PORT`` joins
            that head node. A joined cluster is left running; the workers are
            killed when the job ends. If this process is already connected to Ray
            (``ray.init`` called before), that connection is used and left open.
        workers: how many actors (default: one per ``gpus_per_worker`` GPUs of the cluster with
            ``gpus_per_worker > 0``, else one per ``T`` CPUs of the cluster, ``T`` being this
            process's torch threads, which every worker uses too; at least 1). Each reserves one
            CPU (and ``gpus_per_worker`` GPUs), spread over the nodes, so there are at most as
            many workers as CPUs.
        gpus_per_worker: GPUs each worker reserves (``1``: one worker per GPU; a fraction shares a
            GPU). Needs a model on ``--device cuda``; ``0`` runs the workers on CPUs.
        retries: how often a worker killed in the middle of a part is restarted and the part
            retried.
        connect_timeout: seconds to wait for ``address`` to answer.
        place_timeout: seconds to wait for the cluster to free a CPU (and the GPUs) for every
            worker (other jobs may hold them).
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0.0,
        *,
        retries: int = 3,
        connect_timeout: float = 5.0,
        place_timeout: float = 120.0,
    ) -> None:
        if workers is not None:
            check_count("--workers", workers)
        if (
            isinstance(gpus_per_worker, bool)
            or not isinstance(gpus_per_worker, (int, float))
            or not math.isfinite(gpus_per_worker)
            or gpus_per_worker < 0
        ):
            raise ConfigError(
                f"--gpus-per-worker must be a number >= 0 (1: one worker per GPU, 0.5: two "
                f"workers share a GPU, 0: CPU workers), got {gpus_per_worker!r}"
            )
        check_count("retries", retries, low=0)
        _import_ray()
        if address is not None and address != "auto":
            _probe(address, connect_timeout)
        self.address = address
        self.workers = workers
        self.gpus_per_worker = float(gpus_per_worker)
        self.retries = retries
        self.place_timeout = place_timeout
        self._started = False  # whether this executor called ray.init (so closes it)
        self._actors: list[Any] = []
        self._group: Any = None  # the workers' placement group
        self._key: tuple[ModelSpec, TorchSettings] | None = None

    def run(
        self, parts: Sequence[Part], ctx: Context, on_forward: OnForward | None = None
    ) -> Iterator[tuple[Part, Any]]:
        if not parts:
            return
        if ctx.spec is None:  # a job's bug, not a user's mistake
            raise ConfigError("these parts' context names no model spec; they run only serially")
        ray = _import_ray()
        actors = self._pool(ray, ctx.spec.portable())
        shipped = [ray.put(_Shipped.of(ctx))]  # once; every worker fetches it once
        todo, idle = deque(parts), list(actors)
        running: dict[Any, tuple[Part, Any]] = {}
        try:
            while todo or running:
                while todo and idle:
                    actor, part = idle.pop(0), todo.popleft()
                    running[actor.run.remote(part, shipped)] = (part, actor)
                [ref], _ = ray.wait(list(running), num_returns=1)
                part, actor = running.pop(ref)
                output = self._result(ray, ref, part)
                idle.append(actor)
                if on_forward is not None:
                    on_forward(part.cost(ctx))
                yield part, output
        finally:
            for ref in running:  # stopped early (an error, Ctrl-C): drop what is queued
                with suppress(Exception):
                    ray.cancel(ref)

    def _result(self, ray: Any, ref: Any, part: Part) -> Any:
        try:
            output = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            raise HeadlabError(
                f"the Ray worker running part {part.key} died {self.retries + 1} times "
                f"({type(err).__name__}); the parts finished so far are saved: re-run the same "
                "command to resume (--executor serial shows the failure in this process)"
            ) from None
        if isinstance(output, _Failed):
            raise output.error
        return output

    def _where(self) -> str:
        if self.address is None:
            return "the local Ray cluster"
        return f"the Ray cluster at --ray-address {self.address}"

    def _connect(self, ray: Any) -> None:
        if ray.is_initialized():
            return
        quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        try:
            if self.address is None:  # "local": a new cluster, whatever RAY_ADDRESS says
                ray.init(address="local", include_dashboard=False, **quiet)
            else:
                ray.init(address=self.address, **quiet)
        except ConnectionError as err:
            raise ConfigError(
                f"cannot join {self._where()} ({err}); start one with `ray start --head`, or omit "
                "--ray-address to start a local cluster"
            ) from None
        self._started = True

    def _count(self, ray: Any, spec: ModelSpec, threads: int) -> int:
        """How many workers, after checking the cluster can hold them."""
        res = ray.cluster_resources()
        cpus, gpus, per = int(res.get("CPU", 0)), float(res.get("GPU", 0)), self.gpus_per_worker
        cuda = spec.device.startswith("cuda")
        if per > 0:
            if gpus == 0:
                raise ConfigError(
                    f"--gpus-per-worker {per:g} asks for GPUs but {self._where()} has none; use "
                    "--gpus-per-worker 0 (CPU workers), or join a cluster with GPUs "
                    "(--ray-address HOST:PORT)"
                )
            if not cuda:
                raise ConfigError(
                    f"--gpus-per-worker {per:g} gives each worker a GPU but the model runs on "
                    f"--device {spec.device}; add --device cuda"
                )
            n = self.workers or max(1, int(gpus // per))
            if n * per > gpus + 1e-9:
                raise ConfigError(
                    f"--workers {n} x --gpus-per-worker {per:g} needs {n * per:g} GPUs but "
                    f"{self._where()} has {gpus:g}; use fewer --workers or a smaller "
                    "--gpus-per-worker"
                )
        else:
            if cuda:
                raise ConfigError(
                    f"--device {spec.device} on Ray workers needs GPUs for them: add "
                    "--gpus-per-worker 1 (one worker per GPU)"
                )
            n = self.workers or max(1, cpus // max(1, threads))
        if n > cpus:
            raise ConfigError(
                f"--workers {n} needs {n} CPUs (one per worker) but {self._where()} has {cpus}; "
                f"use --workers {max(1, cpus)} or fewer"
            )
        return n

    def _pool(self, ray: Any, spec: ModelSpec) -> list[Any]:
        """The workers for ``spec``: started (each loading the model) unless already running."""
        settings = TorchSettings.here()
        if self._actors and self._key == (spec, settings):
            return self._actors
        self._kill()
        self._connect(ray)
        n = self._count(ray, spec, settings.threads)
        self._group = self._place(ray, n)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        worker = ray.remote(_Worker)
        self._actors = [
            worker.options(
                num_cpus=1, num_gpus=self.gpus_per_worker, max_restarts=self.retries,
                max_task_retries=self.retries,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, i),
            ).remote(spec, settings)
            for i in range(n)
        ]  # fmt: skip
        try:
            ready = ray.get([a.ready.remote() for a in self._actors])
        except ray.exceptions.RayActorError as err:
            self._kill()
            raise HeadlabError(
                f"a Ray worker died while loading model {spec.model!r} ({err}); is there memory "
                "for one copy of the model per worker? (try fewer --workers)"
            ) from None
        for node, error in ready:
            if error is not None:
                self._kill()
                raise ConfigError(
                    f"the Ray worker on node {node} cannot load model {spec.model!r}: {error}. "
                    "Every node needs the model at the same path (copy the folder there, or "
                    "use a shared file system or a cached hub id); the parts finished so far are "
                    "saved: re-run the same command to resume"
                )
        self._key = (spec, settings)
        return self._actors

    def _place(self, ray: Any, n: int) -> Any:
        """Reserve one CPU (and ``gpus_per_worker`` GPUs) for each of ``n`` workers, spread over
        the nodes; refused when the cluster cannot give them within ``place_timeout``."""
        from ray.util.placement_group import placement_group, remove_placement_group

        bundle = {"CPU": 1.0, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}
        group = placement_group([bundle] * n, strategy="SPREAD")
        if not group.wait(timeout_seconds=self.place_timeout):
            remove_placement_group(group)
            free = ray.available_resources()
            raise ConfigError(
                f"{self._where()} has no room for {n} workers of {bundle} now (free: CPU "
                f"{free.get('CPU', 0):g}, GPU {free.get('GPU', 0):g}; other jobs hold the rest); "
                "wait for them, or use fewer --workers"
            )
        return group

    def _kill(self) -> None:
        if self._actors or self._group is not None:
            ray = _import_ray()
            for actor in self._actors:
                with suppress(Exception):
                    ray.kill(actor, no_restart=True)
            if self._group is not None:
                from ray.util.placement_group import remove_placement_group

                with suppress(Exception):
                    remove_placement_group(self._group)
        self._actors, self._group, self._key = [], None, None

    def close(self) -> None:
        self._kill()
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
