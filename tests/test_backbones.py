"""The backbone registry: offline Lite weights are the real ImageNet networks; others fail clearly offline."""

import urllib.error

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from patchcore.backbones import BACKBONES, NORMALIZATIONS, LayerTaps, fingerprint, get_backbone, load_backbone
from patchcore.errors import BackboneError


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_lite_weights_see_a_cat(name):
    model = load_backbone(name)
    x = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    with torch.inference_mode():
        logits = model((x - 127.0) / 128.0)  # the TF normalisation these weights were trained with
    assert 281 <= int(logits.argmax()) <= 285  # ImageNet's cat classes
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_registry_normalisation_is_the_one_the_weights_were_trained_with(name):
    """The stem's BatchNorm keeps the statistics of what the network saw in training: natural images through
    the registry's normalisation must match them better than through any other normalisation.

    (Cat confidence alone does not tell: Lite0 calls chelsea a cat with p 0.968 under ImageNet statistics
    and 0.952 under its own, yet its features differ enough to cost MVTec screw 0.14 image AUROC.)
    """
    entry, model = get_backbone(name), load_backbone(name)
    imgs = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()]
    x = torch.cat([F.interpolate(torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1)[None].float()
                                 / 255.0, size=(224, 224), mode="bilinear", antialias=True) for a in imgs])
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    live = bn.running_var > 1e-2  # dead channels carry no statistics

    def mismatch(norm: str) -> float:
        mean, std = NORMALIZATIONS[norm]
        with torch.inference_mode():
            y = conv((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        z2 = (y.mean((0, 2, 3)) - bn.running_mean) ** 2 / bn.running_var
        return float(z2[live].mean())

    errors = {norm: mismatch(norm) for norm in NORMALIZATIONS}
    assert entry.normalization == "tf" and min(errors, key=errors.get) == "tf", errors
    assert errors["tf"] < 0.5 * errors["imagenet"], errors  # measured: about 0.17 vs 0.50


def test_taps_give_stride_8_and_16_maps_and_stop_early():
    model = load_backbone("efficientnet_lite0")
    ran = []
    model.conv_head.register_forward_hook(lambda *a: ran.append("head"))
    taps = LayerTaps(model, get_backbone("efficientnet_lite0").layers)
    with torch.inference_mode():
        a, b = taps(torch.zeros(2, 3, 256, 192))
    assert a.shape == (2, 40, 32, 24) and b.shape == (2, 112, 16, 12)
    assert ran == []  # nothing after the deepest tapped layer ran
    with pytest.raises(BackboneError, match="no layer"):
        LayerTaps(model, ("layer9",))


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(BackboneError, match="known: .*efficientnet_lite0"):
        get_backbone("resnet9000")


def test_download_failure_names_offline_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: the weights must be downloaded

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    with pytest.raises(BackboneError, match="efficientnet_lite0.*local weights file"):
        load_backbone("wide_resnet50_2")


def test_local_weights_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    model = load_backbone("resnet18", tmp_path / "r18.pth")
    assert fingerprint(model) == fingerprint(ref)
    lite = BACKBONES["efficientnet_lite0"].build(None)
    torch.save(lite.state_dict(), tmp_path / "lite.pth")
    with pytest.raises(BackboneError, match="does not fit resnet18"):
        load_backbone("resnet18", tmp_path / "lite.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(BackboneError, match="not a readable weights file"):
        load_backbone("resnet18", tmp_path / "junk.pth")


def test_fingerprint_changes_with_weights():
    a = load_backbone("efficientnet_lite0")
    fa = fingerprint(a)
    with torch.no_grad():
        a.conv_stem.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(a) != fa
    assert np.char.isalnum(fa) and len(fa) == 16
