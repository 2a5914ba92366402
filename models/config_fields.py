"""Type checks of parsed config.json fields: nothing is coerced, a wrong JSON type raises naming the field.

A leaf: the family config parsers (`clip`, `llama`, `llava`, `llava_next`) and the loader import it.
"""

import dataclasses
import typing
from typing import Any

__all__ = ["json_type", "KIND_NAMES", "check_field", "check_fields"]


def json_type(value: Any) -> str:
  """The JSON name of a parsed value's type, for messages."""
  if isinstance(value, bool):
    return "boolean"
  if value is None:
    return "null"
  names = {dict: "object", list: "array", str: "string", int: "integer", float: "number"}
  return names.get(type(value), type(value).__name__)


KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_field(value: Any, kind: type, field: str, *, nullable: bool = False, positive: bool = False) -> None:
  """Raises ValueError unless a parsed config.json value has the JSON type `kind` (int, float, bool or str).

  Nothing is coerced: "64" is not an integer, 1 is not true, and a float field takes integers (JSON has one number
  type). `field` is the dotted name for the message (e.g. "text_config.hidden_size"); `positive` also asks >= 1 (for
  sizes), `nullable` admits null.
  """
  if value is None and nullable:
    return
  if kind is bool:
    ok = isinstance(value, bool)
  else:
    ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
  if not ok:
    raise ValueError(f"{field} must be {KIND_NAMES[kind]}{' or null' if nullable else ''}, got {value!r} "
                     f"(a JSON {json_type(value)})")
  if positive and value < 1:
    raise ValueError(f"{field} must be positive, got {value!r}")


def check_fields(hf: dict[str, Any], config_cls: Any, prefix: str, *, positive: bool = False) -> None:
  """`check_field` for every field of the dataclass `config_cls` that `hf` sets, by its annotation: int, float, bool,
  str, or `X | None`; fields of other types are left to the caller. `positive`: integer fields are sizes (>= 1)."""
  for f in dataclasses.fields(config_cls):
    if f.name not in hf:
      continue
    kinds = typing.get_args(f.type) or (f.type,)
    nullable = type(None) in kinds
    kinds = [k for k in kinds if k is not type(None)]
    if len(kinds) == 1 and kinds[0] in KIND_NAMES:
      check_field(hf[f.name], kinds[0], prefix + f.name, nullable=nullable, positive=positive and kinds[0] is int)
