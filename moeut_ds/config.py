"""Model configuration: one dataclass for MoEUT, the σ-MoE baseline and the dense baseline.

Every field is validated up front (`ModelConfig.validate`) so that a bad config fails with a message naming the
field and the fix, before any weights are allocated.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """An invalid model or run configuration; the message names the field and how to fix it."""


def typed_value(name: str, hint: Any, value: Any) -> Any:
    """value checked against a config field's type annotation, so that a wrong type is refused by name here rather
    than failing later as a TypeError deep in a comparison: None only for Optional fields, ints accepted (and
    converted) for floats, floats finite, lists for tuples of the right length (each item checked), Literal
    choices. Returns the value in the field's type."""
    if typing.get_origin(hint) in (Union, types.UnionType):             # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r}: must be one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and len(value) != len(args):
            raise ConfigError(f"{name}={value!r}: expected a list of {len(args)} values")
        return origin(typed_value(f"{name}[{i}]", args[0] if origin is list else args[i], v)
                      for i, v in enumerate(value))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), str: isinstance(value, str),
          float: number and math.isfinite(value), dict: isinstance(value, dict)}.get(origin, hint is Any)
    if not ok:
        what = {float: "a finite number", int: "an integer", bool: "true or false", str: "a string",
                dict: "a mapping", list: "a list", tuple: "a list"}.get(origin, str(hint))
        raise ConfigError(f"{name}={value!r}: expected {what}")
    return float(value) if origin is float else value


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["moeut", "dense"] = "moeut"
    vocab_size: int = 8000
    d_model: int = 412
    n_layers: int = 16                 # L: total depth = number of layer applications
    n_heads: int = 4                   # H
    d_head: int = 82                   # d_h
    # MoEUT / σ-MoE fields (arch == "moeut")
    group_size: int = 2                # G: distinct layers, each applied L / G times
    layer_order: Literal["abab", "aabb"] = "abab"
    norm: Literal["peri", "pre", "post"] = "peri"
    att_n_experts: int = 8             # N_A per head (1 = dense V/O with a sigmoid output gate per head)
    att_k: int = 2                     # K_A
    ff_n_experts: int = 155            # N_E
    ff_expert_size: int = 128          # d_e
    ff_k: int = 12                     # K
    ff_entropy_reg: float = 0.01       # gamma
    att_entropy_reg: float = 0.001     # delta
    ff_expert_dropout: float = 0.0
    att_expert_dropout: float = 0.0
    # dense baseline field (arch == "dense")
    d_ff: int = 2053
    # positional encoding
    rotate_fraction: float = 0.5
    rope_base: float = 10000.0

    @property
    def n_repeats(self) -> int:
        """R = L / G: how many times each distinct layer is applied."""
        return self.n_layers // self.group_size if self.arch == "moeut" else 1

    @property
    def n_distinct_layers(self) -> int:
        return self.group_size if self.arch == "moeut" else self.n_layers

    @property
    def n_rotate(self) -> int:
        """Rotated dims per head: rotate_fraction * d_h rounded down to even (RoPE rotates pairs)."""
        n = int(self.rotate_fraction * self.d_head)
        return n - n % 2

    @property
    def routers(self) -> dict[str, int]:
        """Each distinct layer's routers and the experts each addresses: {"ff": N_E, "v": H*N_A, "o": H*N_A}
        (SwitchHead's only with N_A > 1; none for dense)."""
        if self.arch != "moeut":
            return {}
        n_att = self.n_heads * self.att_n_experts
        return {"ff": self.ff_n_experts, **({"v": n_att, "o": n_att} if self.att_n_experts > 1 else {})}

    def layer_schedule(self) -> list[int]:
        """Index of the distinct layer used at each of the L applications ("abab" or "aabb")."""
        if self.arch == "dense":
            return list(range(self.n_layers))
        g, r = self.group_size, self.n_repeats
        if self.layer_order == "abab":
            return [i % g for i in range(self.n_layers)]
        return [i // r for i in range(self.n_layers)]

    def validate(self) -> "ModelConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.arch in ("moeut", "dense"), f"arch={self.arch!r}: must be 'moeut' or 'dense'")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_head"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name}={getattr(self, name)!r}: must be a positive integer")
        need(0.0 <= self.rotate_fraction <= 1.0, f"rotate_fraction={self.rotate_fraction}: must be in [0, 1]")
        need(self.rope_base > 0, f"rope_base={self.rope_base}: must be positive")
        if self.arch == "dense":
            need(isinstance(self.d_ff, int) and self.d_ff > 0, f"d_ff={self.d_ff!r}: must be a positive integer")
            return self
        for name in ("group_size", "att_n_experts", "att_k", "ff_n_experts", "ff_expert_size", "ff_k"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name}={getattr(self, name)!r}: must be a positive integer")
        need(self.n_layers % self.group_size == 0,
             f"n_layers={self.n_layers} is not divisible by group_size={self.group_size}: each of the G distinct "
             f"layers must be repeated L/G times; pick a group_size that divides n_layers")
        need(self.ff_k <= self.ff_n_experts,
             f"ff_k={self.ff_k} > ff_n_experts={self.ff_n_experts}: top-k cannot pick more experts than exist")
        need(self.att_k <= self.att_n_experts,
             f"att_k={self.att_k} > att_n_experts={self.att_n_experts}: top-k cannot pick more experts than exist "
             f"per head")
        need(self.layer_order in ("abab", "aabb"), f"layer_order={self.layer_order!r}: must be 'abab' or 'aabb'")
        need(self.norm in ("peri", "pre", "post"), f"norm={self.norm!r}: must be 'peri', 'pre' or 'post'")
        for name in ("ff_entropy_reg", "att_entropy_reg"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)}: must be >= 0")
        for name in ("ff_expert_dropout", "att_expert_dropout"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name}={getattr(self, name)}: must be in [0, 1)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls().replace(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` (each checked against its field's type first), validated."""
        hints = typing.get_type_hints(ModelConfig)
        unknown = sorted(set(changes) - set(hints))
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; known fields: {sorted(hints)}")
        typed = {k: typed_value(k, hints[k], v) for k, v in changes.items()}
        return dataclasses.replace(self, **typed).validate()
