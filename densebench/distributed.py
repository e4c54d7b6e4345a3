"""``densebench run`` on N processes: torchrun, or SLURM's ``srun`` with one task per GPU.

A run is distributed when ``WORLD_SIZE`` > 1 in the environment (torchrun sets it), or, without
``WORLD_SIZE``, when ``srun`` started several tasks (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` or
``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` defaults to the step's first node, ``MASTER_PORT`` to a
port derived from the job id). Everything else asks :func:`current` for the :class:`Group`, whose methods
are no-ops in a single process, so one process needs no process group at all.

What the ranks share:

* **work**: extraction is sharded by image (:func:`shard_range`): each rank forwards a contiguous ~1/N of
  the views into a part entry of the shared feature cache; the full entry is assembled when all parts are
  complete (densebench.features). Protocol stages either shard themselves (``score`` reads ``ctx.group``)
  or run on rank 0 while the others wait; rank 0 writes and prints.
* **control**: agreement and failure go through the rendezvous key-value store (a TCPStore client of its
  own), not through collectives: a rank that fails posts its error, and every rank waiting at a
  :meth:`Group.sync` raises :class:`DistributedError` naming that rank at once. Each rank also beats a
  heartbeat counter; a rank that stops beating for ``$DENSEBENCH_DIST_STALL`` seconds (default 600: it
  died, or hangs) makes the waiting ranks fail with its rank number instead of hanging.
* **tensors**: ``torch.distributed`` (NCCL for CUDA tensors, gloo for CPU ones) for sums and DDP.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import pickle
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DenseBenchError

#: seconds without a heartbeat from a rank before the others give up on it
STALL_S = float(os.environ.get("DENSEBENCH_DIST_STALL", "600"))
_BEAT_S = 2.0
_POLL_S = 0.05


class DistributedError(DenseBenchError):
    """Another rank failed or stopped responding; every rank raises this instead of hanging."""


def is_supported() -> bool:
    """``densebench run`` shards its work under torchrun / srun (checked by ``densebench selfcheck``)."""
    return True


# ---------------------------------------------------------------------------------------------------
# The launch environment (shared with neco_train)

def select_backend(device: str) -> str:
    """NCCL when the work runs on CUDA (``cuda[:N]``, or ``auto`` with a GPU), else gloo.
    ``$DENSEBENCH_DIST_BACKEND`` overrides it (``gloo``: several ranks sharing one GPU, which NCCL refuses)."""
    forced = os.environ.get("DENSEBENCH_DIST_BACKEND")
    if forced:
        return forced
    on_cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if on_cuda and torch.cuda.is_available() else "gloo"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-005,010],cpu01`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def slurm_environment(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """torchrun-style variables for a task that ``srun`` started, or None when this is not such a task.

    ``WORLD_SIZE`` set (torchrun, or a launcher of its own) wins; so does a single-task step."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return None
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if int(world) <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    local_world = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or env.get("SLURM_STEP_TASKS_PER_NODE",
                                                                                 "").split("(")[0]
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world, "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
           "MASTER_ADDR": env.get("MASTER_ADDR") or (first_slurm_host(nodes) if nodes else "127.0.0.1"),
           "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(job) % 20000)}
    if local_world.isdigit():
        out["LOCAL_WORLD_SIZE"] = local_world
    return out


def launch_environment() -> dict[str, str]:
    """The torchrun variables of this process (srun's translated), or {} when it runs alone."""
    slurm = slurm_environment()
    if slurm is not None:
        return slurm
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                       "LOCAL_WORLD_SIZE") if k in os.environ}


def local_world_size() -> int:
    """Processes of this run on this machine (they share its cores)."""
    env = launch_environment()
    return max(1, int(env.get("LOCAL_WORLD_SIZE", "1"))) if env else 1


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice of ``n`` items: sizes differ by at most one, in rank order."""
    base, extra = divmod(int(n), int(world))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


# ---------------------------------------------------------------------------------------------------
# The group

@dataclass
class Group:
    """The ranks of one run (``world == 1``: a single process, every method a no-op)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    store: Any = None              # the main thread's store client
    _beat_store: Any = None        # the heartbeat thread's own client
    _counter: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _initialized_here: bool = False
    stall_s: float = STALL_S
    stage: str = "start-up"        # what this rank is doing (named in its failure message)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": self.backend}

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice of ``n`` items."""
        return shard_range(n, self.rank, self.world)

    # --- control through the store -------------------------------------------------------------
    def _next(self, stage: str) -> str:
        self._counter += 1
        return f"s{self._counter}"

    def check_abort(self) -> None:
        """Raise DistributedError when another rank has failed (cheap: one store lookup)."""
        if not self.enabled:
            return
        with self._store_errors():
            if not self.store.check(["failed"]):
                return
            text = self._failure_text()
            self.store.set(f"seen/{self.rank}", b"1")   # the failed rank may wait for this before it exits
        raise DistributedError(text)

    def _failure_text(self) -> str:
        info = pickle.loads(self.store.get("failed"))
        return f"rank {info['rank']} of {self.world} failed during {info['stage']}: {info['error']}"

    @contextlib.contextmanager
    def _store_errors(self):
        """A store that stops answering means its host (torchrun's agent, or rank 0 under srun) is gone."""
        try:
            yield
        except DistributedError:
            raise
        except (RuntimeError, OSError) as e:   # torch's DistStoreError / DistNetworkError are RuntimeErrors
            raise DistributedError(f"rank {self.rank} of {self.world} lost the rendezvous store at {self.stage} "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:200]}): the rank hosting it "
                                   "(torchrun's agent, or rank 0 under srun) has exited",
                                   hint="see the other ranks' logs for the first error") from None

    def _wait_for(self, prefix: str, limit_s: float) -> None:
        """Rank 0 under srun hosts the store: before it exits, let every other rank read what it must."""
        others = [f"{prefix}/{r}" for r in range(self.world) if r != self.rank]
        deadline = time.monotonic() + limit_s
        with contextlib.suppress(Exception):
            while others and not self.store.check(others) and time.monotonic() < deadline:
                time.sleep(_POLL_S)

    def fail(self, error: BaseException, stage: str | None = None) -> None:
        """Tell every rank that this one failed (first failure wins the message)."""
        stage = stage or self.stage
        if not self.enabled or self.store is None:
            return
        if isinstance(error, DistributedError):   # a rank reacting to another's failure: not the cause
            return
        text = f"{type(error).__name__}: {error}" if not isinstance(error, DenseBenchError) else str(error)
        with contextlib.suppress(Exception):
            if self.store.add("failed_count", 1) == 1:
                self.store.set("failed", pickle.dumps({"rank": self.rank, "stage": stage, "error": text[:2000]}))
            self.store.set(f"seen/{self.rank}", b"1")   # a failed rank needs no telling
        if self.is_main:   # keep the store up until the others have read the failure (or 15 s)
            self._wait_for("seen", 15.0)

    def gather(self, obj: Any, stage: str) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank; raises DistributedError when a rank failed
        or stopped responding before reaching ``stage``."""
        if not self.enabled:
            return [obj]
        self.stage = stage
        tag = self._next(stage)
        with self._store_errors():
            self.store.set(f"{tag}/{self.rank}", pickle.dumps(obj))
            keys = [f"{tag}/{r}" for r in range(self.world)]
            self._wait(keys, stage)
            return [pickle.loads(self.store.get(k)) for k in keys]

    def leave(self, limit_s: float = 60.0) -> None:
        """The last use of the store: rank 0 (the store's host under srun) waits for the others to say they are
        done with it before it goes."""
        if not self.enabled or self.store is None:
            return
        if self.is_main:
            self._wait_for("left", limit_s)
        else:
            with contextlib.suppress(Exception):
                self.store.set(f"left/{self.rank}", b"1")

    def sync(self, stage: str) -> None:
        """Wait for every rank to reach ``stage`` (a barrier that names a failed or silent rank)."""
        self.gather(None, stage)

    def share(self, obj: Any, stage: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        return self.gather(obj if self.is_main else None, stage)[0]

    def _wait(self, keys: list[str], stage: str) -> None:
        last = {r: (None, time.monotonic()) for r in range(self.world)}
        while not self.store.check(keys):
            self.check_abort()
            now = time.monotonic()
            for r in range(self.world):
                if r == self.rank or self.store.check([keys[r]]):
                    continue
                beat = int(self.store.add(f"beat/{r}", 0))
                seen, since = last[r]
                if beat != seen:
                    last[r] = (beat, now)
                elif now - since > self.stall_s:
                    raise DistributedError(f"rank {r} of {self.world} has not responded for {now - since:.0f} s "
                                           f"while the others wait at {stage} (it died, or hangs)",
                                           hint="see that rank's log; $DENSEBENCH_DIST_STALL sets this limit")
            time.sleep(_POLL_S)

    # --- tensors --------------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (in place; integer tensors sum exactly)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    # --- lifetime -------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(_BEAT_S):
            with contextlib.suppress(Exception):
                self._beat_store.add(f"beat/{self.rank}", 1)

    def close(self, *, failed: bool = False) -> None:
        """Stop the heartbeat, :meth:`leave` (rank 0 waits up to 60 s, 10 s after a failure, for the others),
        then leave the process group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.leave(10.0 if failed else 60.0)
        if self._initialized_here:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


_SINGLE = Group()
_current: Group = _SINGLE


def current() -> Group:
    """The group of the run in progress (a single process unless :func:`session` started one)."""
    return _current


def rank_device(device: str, group: Group | None = None) -> str:
    """``cuda`` on a rank means that rank's GPU, ``cuda:<local rank>``; anything else is kept."""
    group = group or current()
    if group.enabled and str(device) == "cuda":   # more ranks than GPUs (a test on one GPU): they share
        return f"cuda:{group.local_rank % max(1, torch.cuda.device_count())}"
    return str(device)


def _store_client(env: dict[str, str], timeout_s: float):
    import torch.distributed as dist

    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                          timeout=_dt.timedelta(seconds=timeout_s))
    restart, run_id = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), os.environ.get("TORCHELASTIC_RUN_ID", "")
    prefix = f"densebench/{run_id}/{restart}"
    return dist.PrefixStore(prefix, store)


def start(device: str) -> Group:
    """Join the process group the environment describes (torchrun or srun), or return the single group."""
    global _current
    env = launch_environment()
    if not env:
        _current = _SINGLE
        return _SINGLE
    import torch.distributed as dist

    os.environ.update(env)   # init_process_group's env:// rendezvous reads them
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", rank))
    backend = select_backend(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"   # CPU tensors (confusion counts) through gloo, CUDA ones through NCCL
    here = not dist.is_initialized()
    if here:
        timeout = _dt.timedelta(seconds=max(STALL_S, 1800))
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    threads = max(1, (os.cpu_count() or 1) // local_world_size())
    if torch.get_num_threads() > threads:   # ranks on one machine share its cores
        torch.set_num_threads(threads)
    group = Group(rank=rank, world=world, local_rank=local_rank, backend=backend,
                  store=_store_client(env, 60), _beat_store=_store_client(env, 60), _initialized_here=here)
    group._thread = threading.Thread(target=group._beat, name="densebench-heartbeat", daemon=True)
    group._thread.start()
    if rank == 0:
        print(f"densebench: {world} processes ({backend}), rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}",
              file=sys.stderr)
    _current = group
    return group


@contextlib.contextmanager
def alone():
    """Within the block this rank works as a single process (whole cache entries of its own)."""
    global _current
    saved, _current = _current, _SINGLE
    try:
        yield
    finally:
        _current = saved


@contextlib.contextmanager
def joined(device: str):
    """The group in progress, or a :func:`session` for the duration of the block when this process was launched
    by torchrun / srun and has not joined yet (``densebench.evaluate`` called from a user's script)."""
    if _current.enabled or not launch_environment():
        yield _current
        return
    with session(device) as group:
        yield group


@contextlib.contextmanager
def session(device: str):
    """``with session(device) as group:``: the run's group; an exception on this rank is posted so that the
    other ranks stop at once (naming this rank), and the group is closed at the end."""
    global _current
    group = start(device)
    failed = False
    try:
        yield group
        group.sync("the end of the run")
    except BaseException as e:
        failed = True
        group.fail(e)
        raise
    finally:
        group.close(failed=failed)
        _current = _SINGLE
