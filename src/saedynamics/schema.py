"""The base of every config model: unknown keys refused, no silent type conversions, frozen.

Strict types (`n_latents: true` is not 1, `"64"` is not 64) with one exception that YAML forces:
PyYAML reads YAML 1.1, where a number needs a dot to be a float, so `lr: 3e-4` and
`train_tokens: 5e7` arrive as strings, though every YAML 1.2 reader (and every researcher) reads
numbers. Such strings become numbers, but only for keys whose type is a number.
"""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator

SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _is_number_type(annotation: Any) -> bool:
    """int or float, possibly optional; not bool."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_number_type(a) for a in get_args(annotation))
    return False


def _holds_numbers(annotation: Any) -> bool:
    """list[int], tuple[float, float] and the like, possibly optional."""
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_holds_numbers(a) for a in get_args(annotation))
    return get_origin(annotation) in (list, tuple) and any(
        _is_number_type(a) for a in get_args(annotation)
    )


def yaml12_number(value: Any) -> Any:
    """'3e-4' -> 0.0003, '5e7' -> 50000000 (int when whole); anything else unchanged."""
    if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() else number
    return value


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml12_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, field in cls.model_fields.items():
            if key not in out:
                continue
            if _is_number_type(field.annotation):
                out[key] = yaml12_number(out[key])
            elif _holds_numbers(field.annotation) and isinstance(out[key], list | tuple):
                out[key] = [yaml12_number(v) for v in out[key]]
        return out
