"""The backbone registry: offline Lite weights are the real ImageNet networks; others fail clearly offline."""

import urllib.error

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from patchcore.backbones import BACKBONES, LayerTaps, fingerprint, get_backbone, load_backbone
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
