"""How many threads the scoring libraries of this process use: one decision, read from the environment."""

from __future__ import annotations

import os
import sys
import threading

from ..errors import PatchCoreError

THREADS_ENV = "PATCHCORE_THREADS"


def threads() -> int | None:
    """The intra-op threads every scoring library of this process uses (torch, onnxruntime), from
    ``PATCHCORE_THREADS``; None (unset) leaves each library its own default (one thread per core).

    One decision for the whole process, because the libraries do not know of each other: on a machine with
    other work, a pool of one thread per core per library makes every matrix product wait for cores that are
    busy (docs/benchmarks.md, section 15). The bank search's BLAS products run on one thread each whatever
    this says (patchcore.core.search); it says how many such searches split a large batch of patches."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise PatchCoreError(f"{THREADS_ENV} must be a whole number of threads, at least 1, got {value!r}")
    return int(value)


POOL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def decide(n: int | None = None) -> int | None:
    """Make the process's thread decision reach every pool: ``n`` (or ``PATCHCORE_THREADS`` when None) is put
    in PATCHCORE_THREADS and in the OpenMP and BLAS variables, which those pools read when they start, so call
    it before they start. torch.set_num_threads() alone leaves numpy's BLAS pool (the input resize and the map
    are matrix products) at one thread per core, beside torch's. Variables the user set win."""
    if n is not None:
        os.environ.setdefault(THREADS_ENV, str(int(n)))
    value = threads()
    if value is not None:
        for var in POOL_VARIABLES:
            os.environ.setdefault(var, str(value))
        if "numpy" in sys.modules:
            # numpy's BLAS pool has started (importing patchcore imports numpy, so any decision made after it,
            # such as `patchcore serve`'s one thread, comes too late for the variable): resize the pools that
            # are running. Left at one thread a core, the served map's products woke a second BLAS thread that
            # then spun for ~120 ms after every request, on the core a neighbour needed.
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:
                return value
            blas = os.environ.get("OPENBLAS_NUM_THREADS", "")  # one the user set wins here too
            threadpool_limits(limits=int(blas) if blas.isdigit() and int(blas) > 0 else value, user_api="blas")
    return value


class OneBlasThread:
    """Run numpy's BLAS on one thread while any search or resize runs (re-entrant across threads).

    The search is a few hundred small matrix products per image. With OpenBLAS's default of one thread a
    core, every product wakes and joins the other threads; on a busy 2-core machine each wake-up waits for a
    time slice, and one image took 1.4 s instead of 28 ms (measured on bottle at a load average of 3).
    One thread also makes the products' results independent of the process's BLAS threads: OpenBLAS sums
    in another order with two threads than with one (the resized input differed by 1.5e-5), and the greedy
    coreset turns such differences into another bank (screw: image AUROC 0.9725 or 0.9620 for one seed,
    docs/benchmarks.md, section 21). The limit is process-wide (that is how BLAS works), so it is taken by
    the first user in and given back by the last one out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._limit = None
        self._controller = None

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                try:
                    from threadpoolctl import ThreadpoolController
                except ImportError:  # a dependency; without it results hold for the process's own BLAS threads
                    ThreadpoolController = None  # noqa: N806
                if ThreadpoolController is not None:
                    if self._controller is None:
                        self._controller = ThreadpoolController().select(user_api="blas")
                    self._limit = self._controller.limit(limits=1)
            self._inside += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0 and self._limit is not None:
                self._limit.restore_original_limits()
                self._limit = None


one_blas_thread = OneBlasThread()
