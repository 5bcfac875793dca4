"""save_pretrained / from_pretrained: a directory with config.json and model.safetensors.

config.json carries a format version; a directory written by a newer or an older format, a
missing file, or weights that do not fit the architecture give an InputError saying which.
Files are written atomically, config.json last, so a half-written directory never loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model

from .. import __version__
from ..atomic import atomic_path
from ..errors import InputError
from .config import BiMambaConfig

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp))  # handles tied weights (LM head = embedding)
    meta = {"format_version": FORMAT_VERSION, "genomamba_version": __version__,
            "architecture": type(model).__name__, "config": model.config.to_dict(),
            "head": getattr(model, "head_config", {})}
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise InputError("model directory not found", path=directory)
    if not path.exists():
        raise InputError(f"no {CONFIG_NAME} in the model directory (incomplete save?)", path=directory)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{CONFIG_NAME} is not valid JSON: {exc}", path=path) from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise InputError(
            f"model directory format {version!r}, this genomamba ({__version__}) reads format {FORMAT_VERSION}",
            path=path, hint="upgrade genomamba" if newer else
            f"re-save it with genomamba {meta.get('genomamba_version', 'that wrote it')}")
    return meta


def from_pretrained(directory: str | os.PathLike, *, map_location="cpu") -> torch.nn.Module:
    """Rebuild the saved architecture and load its weights (strict: every tensor must fit)."""
    from .heads import ARCHITECTURES

    directory = Path(directory)
    meta = read_config(directory)
    arch = ARCHITECTURES.get(meta.get("architecture"))
    if arch is None:
        raise InputError(f"unknown architecture {meta.get('architecture')!r}", path=directory / CONFIG_NAME)
    cfg = BiMambaConfig.from_dict(meta["config"], source=str(directory / CONFIG_NAME))
    model = arch(cfg, **meta.get("head", {})) if meta.get("head") else arch(cfg)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.exists():
        raise InputError(f"no {WEIGHTS_NAME} in the model directory", path=directory)
    state = load_file(str(weights_path), device=str(map_location))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _is_tied_alias(model, k, state)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise InputError("weights do not fit the architecture in config.json: "
                         + "; ".join(filter(None, [f"missing {missing[:5]}" if missing else "",
                                                   f"unexpected {unexpected[:5]}" if unexpected else "",
                                                   f"shape mismatch {wrong[:5]}" if wrong else ""])),
                         path=weights_path)
    model.load_state_dict(state, strict=False)
    return model


def _is_tied_alias(model, key, state) -> bool:
    """safetensors' save_model stores one name per shared tensor; the other names are aliases."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    return any(params[key] is params.get(other) for other in state)
