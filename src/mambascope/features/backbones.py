"""Patch encoders by name, built with timm: what network, which weights, what input it expects.

Names: `resnet50-trunc` (ResNet-50 up to layer3 + average pool, 1024-d, the CLAM default),
`resnet50` (2048-d), `resnet34` (512-d), `vit_b16` (ViT-B/16, 768-d), and `timm:<model name>` for any
timm model. Weights: `imagenet` (timm pretrained; downloads, so only when asked), a local file (a state
dict, a checkpoint holding one, or a timm `.safetensors`), or `none` (seeded random init, for tests).
Input size, resize interpolation and normalisation come from timm's data config of the model.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mambascope.errors import CheckpointError, ConfigError

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class BackboneSpec:
    """A registered encoder: the timm model (with the pretrained tag `imagenet` loads) and its cut."""

    timm_name: str
    description: str
    #: drop ResNet layer4 so global pooling sees layer3 (1024 channels)
    truncate_after_layer3: bool = False


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50-trunc": BackboneSpec("resnet50.tv_in1k", "ResNet-50 up to layer3 + average pool (1024-d, CLAM)",
                                   truncate_after_layer3=True),
    "resnet50": BackboneSpec("resnet50.tv_in1k", "ResNet-50, global average pool (2048-d)"),
    "resnet34": BackboneSpec("resnet34.tv_in1k", "ResNet-34, global average pool (512-d)"),
    "vit_b16": BackboneSpec("vit_base_patch16_224.augreg2_in21k_ft_in1k", "ViT-B/16 at 224 px, class token (768-d)"),
}


@dataclass
class Backbone:
    """An encoder ready for inference: `module(x (B, 3, S, S) normalised) -> (B, feature_dim)`."""

    name: str
    module: nn.Module
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    #: provenance written into every features file: `imagenet:<timm tag>`, `file:<name> sha256:<hex>`, `none`
    weights: str
    #: seed of the random init when weights are `none` (recorded so the features can be remade)
    init_seed: int | None = None
    #: the timm model behind the name, e.g. `resnet50.tv_in1k`
    timm_name: str = ""

    def transform_attrs(self) -> dict[str, Any]:
        """The preprocessing applied before the encoder, as recorded in the output attrs."""
        return {"resize": self.input_size, "interpolation": self.interpolation, "antialias": True,
                "mean": list(self.mean), "std": list(self.std), "scale": "1/255"}


def list_backbones() -> list[str]:
    """Registered backbone names (plus any `timm:<name>`)."""
    return sorted(BACKBONES)


def resolve_spec(name: str) -> BackboneSpec:
    """Registry entry for `name`; `timm:<model>` makes an entry on the fly."""
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX):]
        if not timm_name:
            raise ConfigError("empty timm model name in --backbone", hint="write e.g. timm:convnext_tiny")
        return BackboneSpec(timm_name, f"timm model {timm_name}")
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}",
                          hint=f"choose one of {', '.join(list_backbones())} or timm:<model name>")
    return BACKBONES[name]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _build_timm(spec: BackboneSpec, name: str, pretrained: bool) -> nn.Module:
    import timm

    try:
        model = timm.create_model(spec.timm_name, pretrained=pretrained, num_classes=0)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"timm has no model {spec.timm_name!r} (backbone {name})",
                              hint="list names with `python -c 'import timm; print(timm.list_models())'`") from None
        if not pretrained:
            raise
        raise _download_error(spec, exc) from None
    except Exception as exc:
        if not pretrained:
            raise
        raise _download_error(spec, exc) from None
    if spec.truncate_after_layer3:
        if not hasattr(model, "layer4"):
            raise ConfigError(f"{spec.timm_name} has no layer4 to cut", hint="use a ResNet model")
        model.layer4 = nn.Identity()
    return model


def _download_error(spec: BackboneSpec, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot load ImageNet weights for {spec.timm_name} ({type(exc).__name__}: {str(exc)[:200]})",
        hint="`--weights imagenet` downloads through timm / Hugging Face and needs a network; offline, "
             "pass a local weights file with --weights PATH")


def _discardable_prefixes(model: nn.Module, spec: BackboneSpec) -> tuple[str, ...]:
    """Keys a full checkpoint may hold for parts this encoder drops (classifier, ResNet layer4)."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    if spec.truncate_after_layer3:
        names.append("layer4")
    return tuple(f"{n}." for n in names)


def _strip_wrapper_prefix(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Remove one leading component shared by all keys (`model.`, `backbone.`, `encoder.`) if that makes them fit."""
    state = dict(state)
    if not state or any(k in expected for k in state):
        return state
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) == 1 and all("." in k for k in state):
        stripped = {k.split(".", 1)[1]: v for k, v in state.items()}
        if any(k in expected for k in stripped):
            return stripped
    return state


def load_weights_file(model: nn.Module, spec: BackboneSpec, path: Path, backbone_name: str) -> None:
    """Load a local checkpoint into `model`, refusing a file made for another architecture."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read weights file ({type(exc).__name__}: {str(exc)[:160]})", path=path,
                              hint="give a torch state dict (.pth/.pt/.bin), a checkpoint with `state_dict`, "
                                   "or a timm .safetensors file") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("weights file does not hold a state dict of tensors", path=path,
                              hint="save weights with torch.save(model.state_dict(), path)")
    expected = model.state_dict()
    state = _strip_wrapper_prefix(state, expected)
    discard = _discardable_prefixes(model, spec)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not k.startswith(discard)]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label} {len(keys)} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys)
        raise CheckpointError(f"weights file does not fit backbone {backbone_name} ({spec.timm_name}): {details}",
                              path=path,
                              hint=f"pass weights saved from a {spec.timm_name} model, or the --backbone they belong to")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)


def _weights_source(weights: str | Path) -> tuple[str, Path | None]:
    """Classify `weights` as ('imagenet'|'none'|'file', path)."""
    text = str(weights)
    if text.lower() in {"imagenet", "none"}:
        return text.lower(), None
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--weights {text!r} is neither `imagenet`, `none` nor an existing file", path=path,
                          hint="give a local weights file, `imagenet` (needs a network) or `none` (random)")
    return "file", path


def create_backbone(name: str, weights: str | Path = "none", *, seed: int = 0) -> Backbone:
    """Build encoder `name` in eval mode with `weights` (`imagenet`, a file path, or `none`).

    `none` initialises at random from `seed` (same weights in every process, so shards agree) and
    warns: such features are only good for tests. Raises ConfigError for an unknown name,
    CheckpointError for weights that cannot be loaded or belong to another architecture.
    """
    import timm

    spec = resolve_spec(name)
    source, path = _weights_source(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_timm(spec, name, pretrained=source == "imagenet")
    if source == "file":
        load_weights_file(model, spec, path, name)
        provenance = f"file:{path.name} sha256:{_file_digest(path)}"
    elif source == "imagenet":
        provenance = f"imagenet:{spec.timm_name}"
    else:
        provenance = "none"
        warnings.warn(f"backbone {name} has random weights (--weights none): features are meaningless "
                      "except for testing; the output files record weights='none'", UserWarning, stacklevel=2)
    model.eval()
    config = timm.data.resolve_model_data_config(model)
    _, height, width = config["input_size"]
    if height != width:
        raise ConfigError(f"backbone {name} expects a non-square input {height}x{width}",
                          hint="choose a model with square input")
    with torch.no_grad():
        probe = model(torch.zeros(1, 3, height, width))
    if probe.ndim != 2:
        raise ConfigError(f"backbone {name} returns shape {tuple(probe.shape[1:])} per patch, not a vector",
                          hint="choose a timm model with a pooled head")
    return Backbone(name=name, module=model, feature_dim=int(probe.shape[1]), input_size=int(height),
                    mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]),
                    interpolation=str(config.get("interpolation", "bilinear")), weights=provenance,
                    init_seed=seed if source == "none" else None, timm_name=spec.timm_name)
