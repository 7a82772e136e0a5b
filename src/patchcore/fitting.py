"""The fitting plan: which patch features form the memory bank, and how the threshold is cross-fitted.

A fit extracts the patch features of the good images (each at each of its fitted turns), selects the
model's bank from all of them and, for the calibration, one bank per fold from the other folds' images;
every good image (at most ``calibration_max_images``) is then scored against the bank of its own fold's
complement, which gives honest calibration scores (a model scores its own training images too low). An
image's turns stay with it: in its shard and in its calibration fold. :class:`FitPlan` holds the rules;
:meth:`patchcore.PatchCore.fit` and :func:`patchcore.distributed.fit_on_ray` both follow them, so a Ray fit
is the local fit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .coreset import (
    CellRunner,
    CoresetSampler,
    coreset_size,
    cover,
    random_projection,
    shard_coresets,
)
from .errors import PatchCoreError

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total); stages: "features", "coreset", "calibration", "scoring"."""

Scorer = Callable[[np.ndarray, torch.Tensor, list[tuple[int, int]]], list[tuple[float, float]]]
"""scorer(bank, features (n, h, w, D), image sizes) -> (score, map maximum) per image."""


def shard_fold_banks(parts: list[np.ndarray], shard_folds: list[int], folds: int) -> list[np.ndarray]:
    """Each calibration fold's bank when the coreset was selected in shards of whole images inside the folds
    (``parts[i]``: shard i's coreset, of fold ``shard_folds[i]``): the other folds' shard coresets."""
    return [np.concatenate([p for p, f in zip(parts, shard_folds) if f != j]) for j in range(folds)]


@dataclass(frozen=True)
class FitPlan:
    """The settings of a fit that decide its banks and its calibration (from :meth:`PatchCore.fit_plan`)."""

    coreset_ratio: float
    sampler: CoresetSampler
    seed: int
    calibration_folds: int
    calibration_max_images: int | None
    num_neighbors: int
    n_jobs: int | None = None

    def folds(self, n_images: int) -> int:
        """Calibration folds for ``n_images`` good images (below 2: no cross-fit)."""
        return min(int(self.calibration_folds), n_images)

    def n_keep(self, n_features: int) -> int:
        return coreset_size(n_features, self.coreset_ratio)

    def check_keep(self, n_keep: int) -> None:
        if n_keep < self.num_neighbors:
            raise PatchCoreError(
                f"the coreset would hold {n_keep} features, fewer than num_neighbors={self.num_neighbors}: "
                f"use more good images or a larger coreset_ratio")

    def calibration_split(self, n_images: int, folds: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The cross-fit's folds (drawn by seed) and, per fold, the images it scores: a prefix of the fold in
        its random order, the same share of every fold, at most ``calibration_max_images`` in all."""
        order = np.random.default_rng(self.seed).permutation(n_images)
        cap = n_images if self.calibration_max_images is None else min(n_images, int(self.calibration_max_images))
        splits = np.array_split(order, folds)
        return splits, [held[:max(1, round(len(held) * cap / n_images))] for held in splits]

    def plan_shards(self, n_images: int, per_image: int) -> list[tuple[np.ndarray, int]]:
        """How ``n_images`` good images of ``per_image`` patch features each are split for the coreset:
        (image indices, calibration fold) per shard. One shard (fold -1) when they fit in ``shard_features``;
        otherwise each calibration fold (drawn by seed, as the cross-fit draws them) is cut into equal shards,
        so a fold's calibration bank is the other folds' shard coresets."""
        limit = self.sampler.shard_features
        if limit is None or n_images * per_image <= int(limit):
            return [(np.arange(n_images), -1)]
        folds = self.folds(n_images)
        folds = folds if folds >= 2 else 1
        per_fold = -(-n_images * per_image // (int(limit) * folds))  # shards per fold
        order = np.random.default_rng(self.seed).permutation(n_images)
        return [(np.sort(part), j) for j, held in enumerate(np.array_split(order, folds))
                for part in np.array_split(held, min(per_fold, len(held)))]

    def n_parts(self, n_features: int) -> int:
        """How many parts a selection from ``n_features`` features is split into (1: not split)."""
        return self.sampler.n_cells(n_features, self.n_keep(n_features))

    def select_shards(self, shards: list[torch.Tensor], progress: Progress | None = None) -> list[torch.Tensor]:
        """Each shard's coreset (indices into the shard), ``coreset_ratio`` of its features."""
        self.check_keep(sum(self.n_keep(len(x)) for x in shards))
        return shard_coresets(shards, self.coreset_ratio, self.sampler.projection_dim, self.seed, self.n_jobs,
                              progress=(lambda i, n: progress("coreset", i, n)) if progress else None)

    def select_banks(self, feats: torch.Tensor, progress: Progress | None = None,
                     runner: CellRunner | None = None) -> tuple[np.ndarray, list[np.ndarray], int, float | None]:
        """The memory bank of patch features ``feats`` (N, T, h, w, D: each image at each of its turns), each
        calibration fold's bank (none when not cross-fitted), how many parts the selection was split into and
        the bank's selection radius on the projection (:func:`patchcore.coreset.greedy_coreset`; None when
        selected by image shards), which an update's new features are covered to (:meth:`grow`).
        ``runner`` runs the coreset cells elsewhere (see :func:`patchcore.coreset.cell_coreset`)."""
        n_img, n_turns, h, w, d = feats.shape
        folds = self.folds(n_img)
        flat = feats.reshape(-1, d)
        per_image = n_turns * h * w

        def rows(imgs: np.ndarray) -> torch.Tensor:  # the images' rows of ``flat``, all their turns
            return torch.from_numpy((imgs[:, None] * per_image + np.arange(per_image)).ravel())

        if self.sampler.shard_by == "images" and self.sampler.split(n_img * per_image):
            shards = self.plan_shards(n_img, per_image)
            shard_rows = [rows(imgs) for imgs, _ in shards]
            picks = self.select_shards([flat.index_select(0, r) for r in shard_rows], progress)
            parts = [flat.index_select(0, r[p]).float().numpy() for r, p in zip(shard_rows, picks)]
            fold_banks = shard_fold_banks(parts, [f for _, f in shards], folds) if folds >= 2 else []
            return np.concatenate(parts), fold_banks, len(shards), None
        # Each fold's calibration bank is selected the same way from the other folds' images, so the
        # cross-fit scores images as the fitted model will score new ones.
        sets = [np.arange(n_img)] + ([np.setdiff1d(np.arange(n_img), held)
                                      for held in self.calibration_split(n_img, folds)[0]] if folds >= 2 else [])
        wanted = [self.n_keep(len(imgs) * per_image) for imgs in sets]
        banks, radius = [], None
        for k, imgs in enumerate(sets):
            x = flat if k == 0 else flat.index_select(0, rows(imgs))
            done = sum(wanted[:k])  # one "coreset" bar over the model's selection and the folds' ones
            report = (lambda i, n, done=done: progress("coreset", done + i, sum(wanted))) if progress else None
            self.check_keep(wanted[k])
            # Only the model's own bank exchanges centres between cells (cell_exchange): the folds' banks
            # cover 4-5 % less tightly, so the calibration errs on the side of fewer false alarms (800
            # images at 288 px: 13 s more than without it, against 91 s with it in all six selections).
            picks = self.sampler.run(x, wanted[k], self.seed, model_bank=k == 0, n_jobs=self.n_jobs,
                                     progress=report, runner=runner, return_radius=k == 0)
            if k == 0:
                picks, radius = picks
            banks.append(x.index_select(0, picks).float().numpy())
            del x
        return banks[0], banks[1:], self.n_parts(n_img * per_image), radius

    def grow(self, bank: np.ndarray, feats: torch.Tensor, nearest: np.ndarray,
             radius: float | None = None) -> torch.Tensor:
        """Indices of the new patch features ``feats`` (M, D) that join ``bank``, by the coreset's own rule: the
        greedy k-center selection continued from the bank, on the fit's seeded projection, the new feature
        farthest from the bank and from those already added first. Features the bank already covers well
        are never the farthest, so a new variant's features get the places.

        How many: with the fit's selection ``radius`` (:meth:`select_banks`), until no new feature lies
        farther than it from the bank, so the new images are covered as tightly as the fitted ones were and
        images the bank already covers add nothing. Adding a fixed share instead (``coreset_ratio`` of the
        new features, what a fit would keep of them; models saved before the radius was recorded) covers the
        new images more tightly than the old ones, and that unevenness cost screw's image AUROC (0.9631
        against 0.9693 for a full fit, seed 0; docs/benchmarks.md, section 20). The radius rule runs the exact
        continued selection (:func:`patchcore.coreset.cover`); the share rule splits more new features than
        the sampler selects in one piece into k-means cells, each continuing from the bank, ``n_jobs`` at a
        time.

        ``nearest``: each new feature's nearest bank feature in the full feature space (the model's own
        search, which the update needs anyway for its calibration); a feature's distance to the bank is taken,
        on the projection, to that bank feature: at least the exact projected distance, and equal to it
        wherever the projection keeps the nearest neighbour (it is built to keep distances). Searching the
        projection exactly instead pruned poorly (screw: 62 % of the bank compared, 18 s for 90 images,
        against 6 s for the full-space search)."""
        n_keep = self.n_keep(len(feats))
        if n_keep >= len(feats):
            return torch.arange(len(feats))
        dim = self.sampler.projection_dim
        z = random_projection(feats, dim, self.seed)
        zb = random_projection(torch.from_numpy(bank), dim, self.seed)
        initial = (z - zb[torch.from_numpy(np.asarray(nearest, dtype=np.int64))]).norm(dim=1)
        if radius is not None:
            return cover(z, radius, initial)
        return self.sampler.select(z, n_keep, self.seed, n_jobs=self.n_jobs, initial=initial)

    def scored_order(self, n_images: int, folds: int) -> list[int]:
        """The images :meth:`cross_fit` scores, in the order of its scores."""
        return [int(i) for scored in self.calibration_split(n_images, folds)[1] for i in scored]

    def cross_fit(self, feats: torch.Tensor, sizes: Sequence[tuple[int, int]], fold_banks: list[np.ndarray],
                  scorer: Scorer, progress: Progress | None = None) -> tuple[list[float], list[float]]:
        """Scores and map maxima of (at most ``calibration_max_images``, drawn evenly from the folds) images of
        ``feats`` (N, h, w, D), each against ``fold_banks[j]``, the bank selected without its fold j. Folds are
        scored ``n_jobs`` at a time."""
        _, scored_of = self.calibration_split(feats.shape[0], len(fold_banks))
        return self.score_folds(lambda j: scorer(fold_banks[j], feats[torch.from_numpy(scored_of[j])].float(),
                                                 [sizes[i] for i in scored_of[j]]), len(fold_banks), progress)

    def score_folds(self, one: Callable[[int], list[tuple[float, float]]], folds: int,
                    progress: Progress | None = None) -> tuple[list[float], list[float]]:
        """(scores, map maxima) of ``one(j)``, fold j's (score, map maximum) pairs, for every fold in order; folds
        are scored ``n_jobs`` at a time (threads), each reported to ``progress`` as "calibration" when done. The
        cross-fit of a fit and of an update (:meth:`patchcore.PatchCore.update`) both run here."""
        done = [0]

        def run(j: int) -> list[tuple[float, float]]:
            out = one(j)
            done[0] += 1
            if progress:
                progress("calibration", done[0], folds)
            return out

        jobs = max(1, min(folds, self.n_jobs or os.cpu_count() or 1))
        if jobs == 1:
            results = [run(j) for j in range(folds)]
        else:
            with ThreadPoolExecutor(jobs) as pool:
                results = list(pool.map(run, range(folds)))
        pairs = [pair for fold in results for pair in fold]
        return [a for a, _ in pairs], [b for _, b in pairs]
