"""Model configuration: one dataclass, validated, serialised to config.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import InputError
from ..tokenizer import PAD_ID, VOCAB_SIZE


@dataclass
class BiMambaConfig:
    """Caduceus parameterisation: d_state 16, d_conv 4, expand 2, dt_rank = ceil(d_model / 16)."""

    d_model: int = 128
    n_layer: int = 4
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    vocab_size: int = VOCAB_SIZE
    pad_id: int = PAD_ID
    bidirectional: bool = True
    bidirectional_strategy: str = "add"
    tie_in_out_proj: bool = True          # reverse direction shares in_proj/out_proj (Caduceus)
    rc_equivariant: bool = False          # RCPS (Caduceus-PS)
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    gradient_checkpointing: bool = False
    # Scan backward rebuilds its per-tile states instead of the forward keeping them (float32,
    # 4 GiB per direction and layer at d_model 256 x 1 Mb): less memory, a slower backward.
    # None = under gradient_checkpointing, for the forward direction only (the reverse
    # direction's states are freed before the forward's are rebuilt: same peak, half the
    # rebuilds); True = both directions; False = neither (measured in BENCHMARKS.md).
    # Checkpointed tied bidirectional layers on the Triton path (model/checkpointed_mix.py) run
    # no scan forward in their backward, so both directions rebuild there whatever this says.
    recompute_scan_states: bool | None = None
    tie_lm_head: bool = True
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4

    def __post_init__(self):
        problems = []
        if self.d_model <= 0 or self.n_layer <= 0:
            problems.append(f"d_model and n_layer must be positive (got {self.d_model}, {self.n_layer})")
        if self.rc_equivariant and self.d_model % 2:
            problems.append(f"rc_equivariant (RCPS) splits channels into two halves: d_model={self.d_model} must be even")
        if self.bidirectional_strategy != "add":
            problems.append(f"bidirectional_strategy must be 'add' (Caduceus), got {self.bidirectional_strategy!r}")
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank <= 0):
            problems.append(f"dt_rank must be 'auto' or a positive integer, got {self.dt_rank!r}")
        if self.vocab_size < VOCAB_SIZE:
            problems.append(f"vocab_size must be at least {VOCAB_SIZE} (the tokenizer's ids), got {self.vocab_size}")
        if not 0 < self.dt_min <= self.dt_max:
            problems.append(f"need 0 < dt_min <= dt_max (got {self.dt_min}, {self.dt_max})")
        for name in ("d_state", "d_conv", "expand"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if problems:
            raise InputError("invalid model config: " + "; ".join(problems))

    @property
    def mixer_width(self) -> int:
        """Channels each mixer sees: half of d_model under RCPS (both strands share one mixer)."""
        return self.d_model // 2 if self.rc_equivariant else self.d_model

    @property
    def d_inner(self) -> int:
        return self.expand * self.mixer_width

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.mixer_width / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "BiMambaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}", path=source)
        return cls(**data)


def read_yaml(path) -> dict:
    """A YAML config file as a dict; a missing file or bad YAML is an InputError naming the file."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise InputError("config file not found", path=path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML: {exc}", path=path) from exc
    if not isinstance(data, dict):
        raise InputError("a config file must hold a mapping of sections", path=path)
    return data


def load_model_config(path) -> BiMambaConfig:
    """The `model:` section of a YAML config file (unknown keys are an error naming them)."""
    data = read_yaml(path)
    if not isinstance(data.get("model"), dict):
        raise InputError("the config needs a `model:` section", path=path)
    return BiMambaConfig.from_dict(data["model"], source=str(path))
