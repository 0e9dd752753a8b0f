"""Data-parallel attribution on ``torch.distributed``: launched by ``torchrun`` (or ``accelerate launch --multi_gpu``,
which runs torchrun's launcher), every process scores its own shards of the score store; rank 0 merges.

Samples are independent, so ranks never exchange tensors: the only communication is *waiting for each other*
(rank 0 has created the store; every rank has written its shards). That waiting is done here, over the c10d key-value
store of the default process group, with a liveness check, instead of a plain ``dist.barrier()``:

* a plain barrier needs a fixed timeout, but the legitimate wait at the end of scoring (for the slowest rank) can
  last hours on a big model, and a rank that died must not keep the others waiting that long;
* so every rank runs a heartbeat thread (a counter in the store, bumped every few seconds), and a rank waiting at a
  barrier fails with a one-line ``CaplocError`` when a peer that has not arrived stops beating for
  ``CAPLOC_DIST_DEAD_AFTER`` seconds (default 300), or as soon as a peer records that it failed (``finalize()``
  called while an exception propagates does that), or when the store itself is gone (its host died).

Environment (set by the launchers; see docs/scaling.md):

* ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (torchrun and
  ``accelerate launch --multi_gpu`` set all of them). MPI launchers (``mpirun``, as ``accelerate launch --cpu`` with a
  hostfile uses) set ``OMPI_COMM_WORLD_*`` / ``PMI_*`` instead: they are mapped onto the same variables.
* ``CAPLOC_DIST_TIMEOUT`` (s, default 1800): rendezvous and key-value store operations (``init_process_group``).
* ``CAPLOC_DIST_DEAD_AFTER`` (s, default 300): a peer without a heartbeat for this long is declared dead.
* ``CAPLOC_DIST_BARRIER_TIMEOUT`` (s, default none): also give up waiting at a barrier after this long even while
  every peer is alive (a hung, not dead, rank).
* ``CAPLOC_DIST_BACKEND``: force a backend (e.g. ``gloo``); by default gloo for CPU tensors, plus the accelerator's
  default backend (NCCL on NVIDIA GPUs) when the process uses an accelerator, chosen by device type.

A world of one (no launcher) is rank 0 of 1 and nothing here does anything.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import CaplocError

log = logging.getLogger(__name__)

ENV_TIMEOUT = "CAPLOC_DIST_TIMEOUT"
ENV_DEAD_AFTER = "CAPLOC_DIST_DEAD_AFTER"
ENV_BACKEND = "CAPLOC_DIST_BACKEND"
ENV_BARRIER_TIMEOUT = "CAPLOC_DIST_BARRIER_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_DEAD_AFTER_S = 300.0

# launcher variables -> torch.distributed's env:// names (first match wins)
_ENV_ALIASES = {
    "RANK": ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"),
    "WORLD_SIZE": ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"),
    "LOCAL_RANK": ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"),
    "LOCAL_WORLD_SIZE": ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                         "MV2_COMM_WORLD_LOCAL_SIZE"),
}


# ---------------------------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def launch_env(environ=None) -> LaunchEnv:
    """Rank, world size, local rank and local world size from torchrun / accelerate / MPI variables (1 process if none)."""
    env = os.environ if environ is None else environ

    def get(name: str, default: int) -> int:
        for var in _ENV_ALIASES[name]:
            text = env.get(var)
            if text not in (None, ""):
                try:
                    return int(text)
                except ValueError:
                    raise CaplocError(f"environment variable {var}={text!r} is not an integer; fix the launcher "
                                      "command (torchrun sets it)") from None
        return default

    world = get("WORLD_SIZE", 1)
    rank = get("RANK", 0)
    local_rank = get("LOCAL_RANK", rank if world > 1 else 0)
    local_world = get("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(local_world, 1):
        raise CaplocError(f"inconsistent launcher variables (RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, "
                          f"LOCAL_WORLD_SIZE={local_world}); start the run with torchrun")
    return LaunchEnv(rank, world, local_rank, local_world)


def _env_seconds(var: str, default: float) -> float:
    text = os.environ.get(var)
    if not text:
        return default
    try:
        v = float(text)
    except ValueError:
        raise CaplocError(f"{var}={text!r} is not a number of seconds") from None
    if v <= 0:
        raise CaplocError(f"{var} must be > 0 seconds, got {text}")
    return v


def _accelerator_type() -> str | None:
    """The type of this machine's accelerator (e.g. the NVIDIA GPU backend, ``mps``, ``xpu``), or None."""
    try:
        if torch.accelerator.is_available():
            acc = torch.accelerator.current_accelerator()
            return acc.type if acc is not None else None
    except (RuntimeError, AttributeError):  # pragma: no cover - torch builds without the accelerator API
        return None
    return None


def backend_for_device_type(device_type: str) -> str:
    """torch.distributed's default backend for ``device_type`` (gloo for cpu, NCCL for NVIDIA GPUs, ...)."""
    try:
        return dist.get_default_backend_for_device(device_type)
    except (ValueError, RuntimeError, AttributeError):
        return "gloo"


def choose_backend(device: str | None = None) -> str:
    """The process-group backend: ``CAPLOC_DIST_BACKEND`` if set; ``gloo`` when ``device`` is the CPU or the machine
    has no accelerator; else ``cpu:gloo,<acc>:<its default backend>`` (CPU tensors over gloo, device tensors over the
    accelerator's backend, e.g. NCCL)."""
    forced = os.environ.get(ENV_BACKEND)
    if forced:
        return forced.strip()
    acc = _accelerator_type()
    if acc is None or (device is not None and str(device).strip().lower().startswith("cpu")):
        return "gloo"
    dev_backend = backend_for_device_type(acc)
    return "gloo" if dev_backend == "gloo" else f"cpu:gloo,{acc}:{dev_backend}"


# ---------------------------------------------------------------------------------------------------------------------
# state: heartbeat and failure marker in the default group's key-value store
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _State:
    store: object  # a torch.distributed Store (PrefixStore over the default group's store)
    rank: int
    world: int
    dead_after: float
    owned: bool  # we initialised the process group (so finalize destroys it)
    seq: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


_STATE: _State | None = None


def _heartbeat_loop(store, rank: int, interval: float, stop: threading.Event) -> None:
    key = f"hb/{rank}"
    while not stop.is_set():
        try:
            store.add(key, 1)
        except Exception as e:  # the store is gone (its host died or the group was destroyed): stop beating
            log.debug("heartbeat of rank %d stopped: %s", rank, e)
            return
        stop.wait(interval)


def start_heartbeat(store, rank: int, dead_after: float) -> tuple[threading.Event, threading.Thread]:
    """Bump ``hb/<rank>`` in ``store`` every ``dead_after / 10`` s (at most 5 s) from a daemon thread."""
    store.add(f"hb/{rank}", 1)  # the key exists before anyone can wait on this rank
    stop = threading.Event()
    t = threading.Thread(target=_heartbeat_loop, args=(store, rank, min(5.0, dead_after / 10), stop),
                         name=f"caploc-heartbeat-{rank}", daemon=True)
    t.start()
    return stop, t


def store_barrier(store, rank: int, world: int, seq: int, dead_after: float, *, poll: float = 1.0,
                  max_wait: float | None = None) -> None:
    """Wait until all ``world`` ranks reached barrier number ``seq`` (every rank numbers its barriers the same way).

    Raises a one-line CaplocError when a rank that has not arrived stops beating for ``dead_after`` seconds, when a
    rank recorded a failure, when the store is unreachable, or after ``max_wait`` seconds (None: no limit while every
    peer is alive).
    """
    key = f"barrier/{seq}"
    try:
        store.set(f"{key}/{rank}", "1")
        store.add(key, 1)
        t0 = last_hb_check = time.monotonic()
        seen: dict[int, tuple[int, float]] = {}
        sleep = min(0.02, poll)
        while True:
            if store.add(key, 0) >= world:
                return
            if store.check(["failed"]):
                why = store.get("failed").decode(errors="replace")
                raise CaplocError(f"stopping: {why}; rerun the same command to resume from the finished shards")
            now = time.monotonic()
            if now - last_hb_check >= min(poll, dead_after / 4) or not seen:
                last_hb_check = now
                for r in range(world):
                    if r == rank or store.check([f"{key}/{r}"]):
                        continue  # arrived ranks may stop beating (they may even have left already)
                    count = store.add(f"hb/{r}", 0)
                    if r not in seen or seen[r][0] != count:
                        seen[r] = (count, now)
                    elif now - seen[r][1] > dead_after and store.add(key, 0) < world:
                        raise CaplocError(
                            f"rank {r} stopped responding (no heartbeat for {dead_after:.0f} s) while rank {rank} "
                            f"waited at barrier {seq}; it probably died (see its log): rerun the same command to "
                            f"resume from the finished shards (or raise {ENV_DEAD_AFTER})")
            if max_wait is not None and now - t0 > max_wait:
                raise CaplocError(f"rank {rank} waited {max_wait:.0f} s at barrier {seq} for the other ranks; "
                                  f"raise {ENV_BARRIER_TIMEOUT} if they are just slow")
            time.sleep(sleep)
            sleep = min(poll, sleep * 2)
    except CaplocError:
        raise
    except Exception as e:  # DistStoreError / DistNetworkError / RuntimeError from a dead store host
        raise CaplocError(f"lost the rendezvous store while rank {rank} waited at barrier {seq} "
                          f"({_first_line(e)}); the rank hosting it (node rank 0) probably died") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------------------------------------
# public API (used by cli/locate.py and localize.py)
# ---------------------------------------------------------------------------------------------------------------------
def init_from_env(device: str | None = None) -> bool:
    """Initialise the default process group when launched with WORLD_SIZE > 1 (torchrun / accelerate / MPI).

    Backend: gloo for CPU runs, plus the accelerator's default backend (NCCL on NVIDIA GPUs) when there is an
    accelerator and ``device`` is not the CPU; see ``choose_backend``. The rendezvous times out after
    ``CAPLOC_DIST_TIMEOUT`` s (default 1800). Returns True if this call initialised the group.
    """
    global _STATE
    env = launch_env()
    if env.world <= 1:
        return False
    if not dist.is_available():
        raise CaplocError("this torch build has no torch.distributed; run one process (without torchrun)")
    if dist.is_initialized():  # the caller set it up: use it, leave it to them to destroy
        _STATE = _STATE or _attach(owned=False)
        return False
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise CaplocError(f"WORLD_SIZE={env.world} but {var} is not set; start the run with torchrun "
                              "(or set MASTER_ADDR and MASTER_PORT)")
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    backend = choose_backend(device)
    acc = _accelerator_type()
    if acc is not None and "gloo" != backend and env.local_rank < torch.accelerator.device_count():
        torch.accelerator.set_device_index(env.local_rank)  # one device per local rank, before any collective
    timeout = _env_seconds(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)
    log.info("rank %d/%d (local %d): joining %s:%s with backend %s (timeout %.0f s)", env.rank, env.world,
             env.local_rank, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], backend, timeout)
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world,
                                timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:  # DistError subclasses RuntimeError
        raise CaplocError(f"rank {env.rank} could not join the process group at {os.environ['MASTER_ADDR']}:"
                          f"{os.environ['MASTER_PORT']} within {timeout:.0f} s ({_first_line(e)}); check that all "
                          f"{env.world} processes were started and can reach it") from None
    _STATE = _attach(owned=True)
    return True


def _attach(owned: bool) -> _State | None:
    """Heartbeat + barrier state over the default group's store (None if the store is not reachable)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        base = _get_default_store()
    except Exception as e:  # pragma: no cover - private API moved: fall back to dist.barrier()
        log.warning("no access to the process group's store (%s); barriers have no liveness check", e)
        return None
    prefix = f"caploc/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store = dist.PrefixStore(prefix, base)
    dead_after = _env_seconds(ENV_DEAD_AFTER, DEFAULT_DEAD_AFTER_S)
    st = _State(store, dist.get_rank(), dist.get_world_size(), dead_after, owned)
    st.stop, st.thread = start_heartbeat(store, st.rank, dead_after)
    return st


def dist_info(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device).

    With a process group and an accelerator: ``auto`` or a bare accelerator name (``--device <acc>``) becomes the
    LOCAL_RANK-th device of that accelerator; an explicit index or ``cpu`` is kept as given.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, device
    rank, world = dist.get_rank(), dist.get_world_size()
    text = str(device).strip().lower()
    acc = _accelerator_type()
    if acc is None or ":" in text or text not in ("auto", acc):
        if acc is not None and ":" in text and not text.startswith(("cpu", "meta")) and world > 1:
            log.warning("rank %d uses %s as given; pass --device %s (no index) to give each local rank its own device",
                        rank, device, acc)
        return rank, world, device
    local_rank = launch_env().local_rank
    n = torch.accelerator.device_count()
    if local_rank >= n:
        raise CaplocError(f"local rank {local_rank} has no {acc} device (this node has {n}); start at most {n} "
                          "processes per node (torchrun --nproc-per-node) or use --device cpu")
    return rank, world, f"{acc}:{local_rank}"


def is_main() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank; fails (one line) instead of hanging when a peer died. No-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    st = _STATE
    if st is None:
        dist.barrier()
        return
    st.seq += 1
    cap = _env_seconds(ENV_BARRIER_TIMEOUT, 0.0) if os.environ.get(ENV_BARRIER_TIMEOUT) else None
    store_barrier(st.store, st.rank, st.world, st.seq, st.dead_after, max_wait=cap)


def finalize() -> None:
    """Stop the heartbeat and destroy the process group this module created.

    Called from a ``finally`` while an exception propagates, it first records the failure in the store, so ranks
    waiting at a barrier stop at once instead of after ``CAPLOC_DIST_DEAD_AFTER``.
    """
    global _STATE
    st, _STATE = _STATE, None
    if st is not None:
        exc = sys.exc_info()[1]
        if exc is not None and not (isinstance(exc, SystemExit) and not exc.code):
            try:
                st.store.set_timeout(datetime.timedelta(seconds=10))
                st.store.set("failed", f"rank {st.rank} failed ({_first_line(exc)})")
            except Exception:  # best effort: the store may be gone too
                pass
        st.stop.set()
        if st.thread is not None:
            st.thread.join(timeout=10)
    if st is not None and st.owned and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # pragma: no cover - best effort at shutdown
            log.debug("destroy_process_group failed: %s", e)


__all__ = [
    "LaunchEnv", "launch_env", "choose_backend", "backend_for_device_type", "init_from_env", "dist_info", "is_main",
    "barrier", "finalize", "store_barrier", "start_heartbeat",
]
