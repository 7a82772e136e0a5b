"""Past one machine with Ray: score image archives with a pool of workers, fit many products at once.

Ray is an optional extra (``pip install "patchcore[ray]"``). Without an address a local Ray is started on
this machine and stopped afterwards; with one (``ray://host:10001`` or ``host:6379``) the work joins that
cluster, whose nodes must see the same files (model, images, output folder) at the same paths.

- :func:`predict_files`: Ray Data over the file list, ``map_batches`` with a pool of actors that each load the
  model once and write each image's files (:mod:`patchcore.results`) as single-process ``predict`` does. The
  driver appends every finished row to ``OUTPUT/progress.jsonl`` as it arrives; a rerun after a crash reads it
  and scores only what is missing.
- :func:`fit_many`: one Ray task per product folder, its memory request estimated from its image count; every
  product's outcome is reported and one failure does not stop the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PatchCoreError
from .jobs import check_model_path, good_images, score_files

LEDGER = "progress.jsonl"
INSTALL_HINT = 'Ray is not installed: pip install "patchcore[ray]"'


def require_ray():
    """The ray module, or a one-line error that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra brings Ray Data; a bare `pip install ray` does not)
    except ImportError:
        raise PatchCoreError(INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def cluster(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connected Ray: a local one started here (and stopped on exit) without ``address``, else that cluster."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PatchCoreError(f"cannot reach Ray at {address}: {str(e).splitlines()[0]}" if address
                             else f"cannot start a local Ray: {str(e).splitlines()[0]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------- batch scoring
class _Scorer:
    """Ray Data actor: loads the model once, then scores batches of files and writes their results."""

    def __init__(self, model_path: str, output: str, threshold: float | None, map_format: str,
                 skip_unreadable: bool) -> None:
        import torch

        from .inference import load_model, thresholds_in_force

        torch.set_num_threads(1)  # one actor per CPU: more threads per actor only contend
        self.model = load_model(model_path, device="cpu")
        self.thresholds = thresholds_in_force(self.model, threshold, "--threshold", model_name=model_path)
        self.output, self.map_format, self.skip = Path(output), map_format, skip_unreadable

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths, names = [str(p) for p in batch["path"]], [str(n) for n in batch["name"]]
        skipped: list[tuple[str, str]] = []
        # One image per forward pass, as before: the rows are those of a single process on one thread.
        rows = score_files(self.model, paths, names, self.output, self.thresholds, self.map_format,
                           skip_unreadable=self.skip, skipped=skipped, batch_size=1)
        name_of = dict(zip(paths, names))
        by_path = {r["path"]: r for r in rows}
        by_path.update((p, {"name": name_of[p], "path": p, "skipped": reason}) for p, reason in skipped)
        rows = [by_path[p] for p in paths]  # in the batch's order, as the ledger records them
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}


def run_key(model_path: str | os.PathLike, threshold: float | None, map_format: str) -> dict[str, Any]:
    """What must match for a rerun to continue an interrupted run's results rather than mix in others."""
    from .core.files import file_sha256

    return {"model_sha256": file_sha256(Path(model_path)), "threshold": threshold, "map_format": map_format}


def read_ledger(output: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The run key and the finished rows (by name) of ``OUTPUT/progress.jsonl``; a torn last line (a crash
    mid-write) is ignored, so that image is simply scored again."""
    path = output / LEDGER
    if not path.is_file():
        return None, {}
    key, rows = None, {}
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if i == 0:
                key = obj.get("run")
            elif isinstance(obj, dict) and "name" in obj:
                rows[obj["name"]] = obj
    return key, rows


def predict_files(model_path: str | os.PathLike, files: Sequence[str | os.PathLike], names: Sequence[str],
                  output: str | os.PathLike, *, threshold: float | None = None, map_format: str = "both",
                  skip_unreadable: bool = False, address: str | None = None, workers: int | None = None,
                  batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Score ``files`` on Ray and write their results under ``output`` (named ``names``), resuming an
    interrupted run of the same model and options found there. Returns the rows in ``files`` order
    (unreadable images, with ``skip_unreadable``, as rows holding a "skipped" reason)."""
    from .results import RESULT_DIRS

    output = Path(output)
    key = run_key(model_path, threshold, map_format)
    old_key, done = read_ledger(output)
    if old_key is not None and old_key != key:
        raise PatchCoreError(f"{output} holds results of another model or other options; choose another "
                             f"folder or pass --overwrite")
    output.mkdir(parents=True, exist_ok=True)
    for d in RESULT_DIRS:
        (output / d).mkdir(exist_ok=True)
    todo = [(str(f), n) for f, n in zip(files, names) if n not in done]
    if progress:
        progress(len(files) - len(todo), len(files))
    if todo:
        with cluster(address, workers) as ray:
            n_workers = max(1, min(workers or int(ray.cluster_resources().get("CPU", 1)), len(todo)))
            ds = ray.data.from_items([{"path": f, "name": n} for f, n in todo])
            ds = ds.map_batches(_Scorer, fn_constructor_args=(str(model_path), str(output), threshold, map_format,
                                                              skip_unreadable),
                                batch_size=batch_size, concurrency=n_workers, num_cpus=1)
            new = old_key is None
            with open(output / LEDGER, "a", encoding="utf-8") as fh:
                if new:
                    fh.write(json.dumps({"run": key}) + "\n")
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for line in batch["row"]:
                        row = json.loads(line)
                        done[row["name"]] = row
                        fh.write(line + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                    if progress:
                        progress(len(done), len(files))
    return [done[n] for n in names if n in done]


# --------------------------------------------------------------------------------------- many products
def products_of(root: str | os.PathLike) -> list[Path]:
    """The product folders of ``root``: its subfolders that hold good images (train/good, good/ or images;
    :func:`patchcore.jobs.good_images`)."""
    root = Path(root)
    if not root.is_dir():
        raise PatchCoreError(f"{root}: no such folder")
    found = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and _has_good_images(p)]
    if not found:
        raise PatchCoreError(f"{root}: no product folders (subfolders with train/good/, good/ or images)")
    return found


def _has_good_images(product: Path) -> bool:
    try:
        good_images(product)
    except PatchCoreError:
        return False
    return True


def fit_product(product: str | os.PathLike, output: str | os.PathLike, params: dict[str, Any],
                overwrite: bool = False, skip_unreadable: bool = False) -> dict[str, Any]:
    """Fit one product's model and save it; the outcome as a row (never raises for the product's own faults).
    ``skip_unreadable``: unreadable good images are left out (counted in the row's ``skipped``)."""
    from .model import PatchCore

    product, output = Path(product), Path(output)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"product": product.name, "model": str(output)}
    try:
        goods, _ = good_images(product)
        row["images"] = len(goods)
        check_model_path(output, overwrite)
        model = PatchCore(**params).fit(goods, skip_unreadable=skip_unreadable)
        model.save(output, overwrite=overwrite)
        info = model.fit_info_
        row.update(status="ok", bank_size=info["bank_size"], threshold=model.threshold_)
        if skip_unreadable:
            row["skipped"] = len(model.skipped_)
    except Exception as e:  # noqa: BLE001 - one product's failure is its row, not the run's end
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        row.update(status="failed", error=msg if isinstance(e, PatchCoreError) else f"{type(e).__name__}: {msg}")
        if not isinstance(e, PatchCoreError):
            row["traceback"] = traceback.format_exc(limit=-3)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


PROCESS_BYTES = int(1.5e9)  # a fitting process before its features: interpreter, torch, network (measured)


def fit_memory(n_images: int, patches_per_image: int, width: int) -> int:
    """Bytes, for Ray's scheduler, that a process fitting on ``n_images`` needs: their patch features as
    float32, twice (the selection's copies), plus :data:`PROCESS_BYTES`. The one estimate for ``fit-many``'s
    tasks and ``fit --ray``'s shard workers."""
    return int(2 * 4 * patches_per_image * width * n_images + PROCESS_BYTES)


def patch_shape(params: dict[str, Any], images: Sequence[str | os.PathLike]) -> tuple[int, int, int, int]:
    """(turns, grid height, grid width, feature width) of the patch features a model with ``params`` fits on
    per good image of ``images``: one forward pass of a blank image at the network input the fit would choose
    (every image is fitted into that input, so every image gives this grid) and the number of its ``turns``
    (each as many patches)."""
    from .model import PatchCore

    model = PatchCore(**params)
    h, w = model.input_size_for(images, skip_unreadable=True)
    model.set_geometry((h, w), None)
    feats, _ = model.extract(np.zeros((1, h, w, 3), np.uint8))
    return len(model.turns), int(feats.shape[1]), int(feats.shape[2]), int(feats.shape[3])


def fit_many(root: str | os.PathLike, models_dir: str | os.PathLike, params: dict[str, Any], *,
             use_ray: bool = False, address: str | None = None, overwrite: bool = False,
             skip_unreadable: bool = False,
             progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Fit a model per product folder of ``root`` into ``models_dir``/PRODUCT.safetensors; with ``use_ray``
    one Ray task per product (each asks for one CPU and its estimated memory). Returns the outcomes in
    product order; ``progress`` gets each outcome as it finishes."""
    products = products_of(root)
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise PatchCoreError(f"{models_dir}: no such folder")
    outs = {p.name: models_dir / f"{p.name}.safetensors" for p in products}
    results: dict[str, dict[str, Any]] = {}
    if not use_ray:
        for p in products:
            results[p.name] = fit_product(p, outs[p.name], params, overwrite, skip_unreadable)
            if progress:
                progress(results[p.name])
    else:
        with cluster(address) as ray:
            task = ray.remote(num_cpus=1)(_fit_task)
            memory = {}
            for p in products:
                try:
                    goods = good_images(p)[0]
                    t, h, w, d = patch_shape(params, goods)
                    memory[p.name] = fit_memory(len(goods), t * h * w, d)
                except PatchCoreError:  # no readable good image: its task fails and says why in its row
                    memory[p.name] = fit_memory(0, 0, 0)
            refs = {task.options(memory=memory[p.name], name=f"fit {p.name}").remote(
                str(p), str(outs[p.name]), params, overwrite, skip_unreadable): p.name for p in products}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                name = refs[ready[0]]
                try:
                    results[name] = ray.get(ready[0])
                except Exception as e:  # noqa: BLE001 - the worker died (out of memory, node lost): that product failed
                    results[name] = {"product": name, "model": str(outs[name]), "status": "failed",
                                     "error": f"Ray task failed: {str(e).splitlines()[0]}"}
                if progress:
                    progress(results[name])
    return [results[p.name] for p in products]


def _fit_task(product: str, output: str, params: dict[str, Any], overwrite: bool,
              skip_unreadable: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # Ray gave this task one CPU
    return fit_product(product, output, {**params, "n_jobs": 1}, overwrite, skip_unreadable)


# ------------------------------------------------------------------------------------ one large product
class _ShardWorker:
    """Ray actor for shards of whole images: extracts each given shard's patch features once and keeps them,
    sends them to the driver or selects the shard's coreset itself, then scores its images (all of one
    calibration fold) against that fold's bank. A fixed pool of these (one per CPU) takes the shards in turn,
    so no shard waits for a CPU an idle actor holds."""

    def __init__(self, params: dict[str, Any], input_size: tuple[int, int], channels: str) -> None:
        import torch

        from .model import PatchCore

        torch.set_num_threads(1)
        # The driver chose the network input and the channels from all the good images, as a local fit does.
        self.model = PatchCore(**{**params, "n_jobs": 1}).set_geometry(input_size, channels)
        self.shards: dict[int, tuple[Any, list]] = {}
        self.cells: Any = None  # the CellGroup of the cell selection under way

    def _features(self, index: int, paths: list[str]) -> Any:
        if index not in self.shards:
            self.shards[index] = self.model.extract(paths, turned=True)
        return self.shards[index][0]

    def extract(self, index: int, paths: list[str]) -> tuple[np.ndarray, list]:
        """Shard ``index``'s patch features (n, T, h, w, D) and image sizes, as ``PatchCore.extract`` gives them."""
        feats = self._features(index, paths)
        return feats.numpy(), self.shards[index][1]

    def select(self, index: int, paths: list[str]) -> np.ndarray:
        """Shard ``index``'s coreset features, selected as :func:`patchcore.coreset.shard_coresets` selects
        shard ``index`` (seeded ``seed + index``)."""
        from .coreset import select

        m = self.model
        feats = self._features(index, paths)
        flat = feats.reshape(-1, feats.shape[-1])
        picks = select(flat, m.coreset_ratio, m.sampler.projection_dim, seed=m.seed + index)
        return flat.index_select(0, picks).float().numpy()

    def load_cells(self, cells: list[tuple[np.ndarray, int]], exchange: bool) -> None:
        """Take these cells (points, first centre) of a cell selection, replacing the previous selection's."""
        import torch

        from .coreset import CellGroup

        self.cells = None  # let the previous selection's points go before the new ones arrive
        self.cells = CellGroup([(torch.from_numpy(np.array(z)), start) for z, start in cells], 1, exchange)

    def lower(self, radius: float) -> tuple[int, float]:
        return self.cells.lower(radius)

    def fresh(self) -> list[np.ndarray]:
        return [c.numpy() for c in self.cells.fresh()]

    def hear(self, centres: np.ndarray, reach: np.ndarray) -> None:
        import torch

        self.cells.hear(torch.from_numpy(np.array(centres)), torch.from_numpy(np.array(reach)))  # writable copies

    def picks(self) -> list[tuple[list[int], list[float]]]:
        return self.cells.picks()

    def score(self, index: int, bank: np.ndarray, positions: list[int]) -> tuple[list[float], list[float]]:
        """Scores and map maxima of shard ``index``'s images at ``positions`` against ``bank``."""
        import torch

        if not positions:
            return [], []
        feats, sizes = self.shards[index]
        out = self.model.score_summary(bank, feats[torch.tensor(positions), 0].float(), [sizes[i] for i in positions])
        return [s for s, _ in out], [m for _, m in out]


class _RayCells:
    """The ``lower`` and ``picks`` of :class:`patchcore.coreset.CellGroup` over cells spread on Ray actors
    (largest cell first, each to the actor with the fewest points), so the shared-radius loop of
    :func:`patchcore.coreset.cell_coreset` runs on the driver and the cells' greedy loops on the workers."""

    def __init__(self, ray: Any, actors: list[Any], cells: list[tuple[Any, int]], exchange: bool) -> None:
        load, mine = [0] * len(actors), [[] for _ in actors]
        for i in sorted(range(len(cells)), key=lambda i: -len(cells[i][0])):
            a = int(np.argmin(load))
            mine[a].append(i)
            load[a] += len(cells[i][0])
        self.ray = ray
        self.actors = [a for a, m in zip(actors, mine) if m]
        self.mine = [m for m in mine if m]
        ray.get([a.load_cells.remote([(cells[i][0].numpy(), cells[i][1]) for i in m], exchange)
                 for a, m in zip(self.actors, self.mine)])

    def lower(self, radius: float) -> tuple[int, float]:
        got = self.ray.get([a.lower.remote(radius) for a in self.actors])
        return sum(t for t, _ in got), max(g for _, g in got)

    def fresh(self) -> list[Any]:
        import torch

        out: list[Any] = [None] * sum(len(m) for m in self.mine)
        for m, got in zip(self.mine, self.ray.get([a.fresh.remote() for a in self.actors])):
            for i, c in zip(m, got):
                out[i] = torch.from_numpy(np.array(c))  # a writable copy of Ray's read-only array
        return out

    def hear(self, centres: Any, reach: Any) -> None:
        """Every actor hears of all new centres, with the bounds of its own cells."""
        c = self.ray.put(centres.numpy())
        self.ray.get([a.hear.remote(c, reach[:, m].numpy()) for a, m in zip(self.actors, self.mine)])

    def picks(self) -> list[tuple[list[int], list[float]]]:
        out: list[Any] = [None] * sum(len(m) for m in self.mine)
        for m, got in zip(self.mine, self.ray.get([a.picks.remote() for a in self.actors])):
            for i, p in zip(m, got):
                out[i] = p
        return out


def fit_on_ray(images: Sequence[str | os.PathLike], params: dict[str, Any], *, address: str | None = None,
               workers: int | None = None, progress: Callable[[str, int, int], None] | None = None):
    """``PatchCore(**params).fit(images)`` with its work spread over ``workers`` Ray actors (default: one per
    CPU of the cluster). The good images are cut into shards of whole images inside the calibration folds
    (:meth:`patchcore.fitting.FitPlan.plan_shards`), which the actors take in turn.

    With ``shard_by="features"`` (the default) the actors extract their shards' patch features and send them
    to the driver, which selects the bank and every calibration fold's bank in k-means cells of the feature
    space, as a local fit does: the driver draws the cells and lowers the shared radius, the actors run the
    cells' greedy loops. With ``shard_by="images"`` each actor selects its shards' coresets itself and only
    those travel (no machine holds every feature, at a cost in accuracy: docs/scaling.md). Either way the
    actors then score their images against their fold's bank for the cross-fitted calibration, and the model
    is the local fit's with the same parameters. A product that fits in one shard is fitted here, as a local
    fit would."""
    import torch

    from .fitting import shard_fold_banks
    from .model import PatchCore

    paths = [str(p) for p in images]
    model = PatchCore(**params)
    model.check_params()
    plan = model.fit_plan()
    t, h, w, d = patch_shape(params, paths)
    shards = plan.plan_shards(len(paths), t * h * w)
    if len(shards) == 1:
        return model.fit(paths, progress=progress)
    folds = plan.folds(len(paths))
    t0 = time.perf_counter()
    model.set_geometry(model.input_size_for(paths), model.channels_for(paths))
    per_shard = fit_memory(max(len(i) for i, _ in shards), t * h * w, d) - PROCESS_BYTES
    with cluster(address) as ray:
        n_workers = max(1, min(len(shards), workers or int(ray.cluster_resources().get("CPU", 1))))
        worker = ray.remote(num_cpus=1)(_ShardWorker)
        # An actor keeps the features of every shard it takes, for the calibration scoring, and with cells its
        # share of the projected points (float32) during a selection.
        cells = (4 * len(paths) * t * h * w * model.sampler.projection_dim // n_workers
                 if model.sampler.shard_by == "features" else 0)
        pool = [worker.options(memory=per_shard * -(-len(shards) // n_workers) + cells + PROCESS_BYTES).remote(
            params, model.preprocessing.resize, model.preprocessing.channels) for _ in range(n_workers)]
        actors = [pool[i % n_workers] for i in range(len(shards))]  # shard i lives on actor i mod n
        jobs = [(a, i, [paths[k] for k in imgs]) for i, (a, (imgs, _)) in enumerate(zip(actors, shards))]
        if model.sampler.shard_by == "images":
            picked = []
            for i, ref in enumerate([a.select.remote(i, p) for a, i, p in jobs]):
                picked.append(ray.get(ref))
                if progress:
                    progress("coreset", i + 1, len(jobs))
            t1 = t0  # extraction ran on the workers, inside coreset_seconds
            bank = np.concatenate(picked)
            fold_banks = shard_fold_banks(picked, [f for _, f in shards], folds) if folds >= 2 else []
            n_parts, radius = len(shards), None
        else:
            feats, sizes, done = None, [None] * len(paths), 0
            for (imgs, _), ref in zip(shards, [a.extract.remote(i, p) for a, i, p in jobs]):
                part, part_sizes = ray.get(ref)
                if feats is None:
                    feats = np.empty((len(paths), *part.shape[1:]), dtype=part.dtype)
                feats[imgs] = part
                for k, size in zip(imgs, part_sizes):
                    sizes[k] = size
                done += len(imgs)
                if progress:
                    progress("features", done, len(paths))
            t1 = time.perf_counter()
            bank, fold_banks, n_parts, radius = plan.select_banks(
                torch.from_numpy(feats), progress, runner=lambda cells, ex: _RayCells(ray, pool, cells, ex))
            del feats
        t2 = time.perf_counter()
        cross = None
        if folds >= 2:
            fold_refs = [ray.put(b) for b in fold_banks]
            # The images the local cross-fit scores, in its order (FitPlan.cross_fit): a prefix of each fold.
            wanted = [i for scored in plan.calibration_split(len(paths), folds)[1] for i in scored]
            chosen = set(int(i) for i in wanted)
            asks = [[k for k, i in enumerate(imgs) if int(i) in chosen] for imgs, _ in shards]
            got = ray.get([a.score.remote(i, fold_refs[f], pos)
                           for i, (a, (_, f), pos) in enumerate(zip(actors, shards, asks))])
            by_image = {int(imgs[k]): (s, m) for (imgs, _), pos, (ss, mm) in zip(shards, asks, got)
                        for k, s, m in zip(pos, ss, mm)}
            cross = ([by_image[int(i)][0] for i in wanted], [by_image[int(i)][1] for i in wanted])
        for a in pool:
            ray.kill(a)
    return model.set_fitted(bank, {
        "n_images": len(paths), "n_features": len(paths) * t * h * w, "feature_dim": int(d), "grid": [h, w],
        "turns": t,
        "extract_seconds": t1 - t0, "shards": n_parts, "shard_by": model.sampler.shard_by, "coreset_seconds": t2 - t1,
        "coreset_radius": radius, "skipped": 0, "ray": True, "ray_workers": n_workers, "coreset_on_workers": True},
        cross, folds, t0, t2)
