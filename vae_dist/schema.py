"""Config sections: strict pydantic models whose fields carry flag, help and resume rule, with one-line errors."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vae_dist.errors import ConfigError

FLOAT32_TINY, FLOAT32_MAX = 2.0**-126, (2 - 2.0**-23) * 2.0**127  # float32's smallest and largest normal numbers


def option(default: Any, help: str, *, flag: Optional[str] = None, resumable: bool = False,
           shown: Optional[str] = None, **constraints: Any) -> Any:
    """A field: its default, help, flag (default ``--field-name``), whether it may differ on ``--resume`` (only what
    drives, logs or stores a run, never which samples it sees or what the model is), and ``--help``'s default."""
    extra = {"flag": flag, "resumable": resumable, "shown": shown}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


class Section(BaseModel):
    """Base of every section; ``path = "data"`` in a section's body names ``data.batch_size`` in its errors."""

    # No infinities or NaN: an infinite rate or weight passes every bound and then trains nothing.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, protected_namespaces=())
    path: ClassVar[str] = ""

    @field_validator("*", mode="after")
    @classmethod
    def _holdable(cls, value: Any) -> Any:
        # What the layers below cannot hold: a NUL byte (the OS refuses it with a ValueError of its own), and a float
        # outside float32's normal range (rates, weights and guards are applied in float32, subnormals flushed to
        # zero: it would act as 0 or infinity).
        for x in value if isinstance(value, tuple) else (value,):
            if isinstance(x, str) and "\x00" in x:
                raise ValueError("must not contain a NUL byte")
            if isinstance(x, float) and 0 < abs(x) < FLOAT32_TINY:
                raise ValueError(f"{x!r} is below float32's smallest normal number ({FLOAT32_TINY:.4g}) and would act "
                                 "as 0")
            if isinstance(x, float) and abs(x) > FLOAT32_MAX:
                raise ValueError(f"{x!r} is above float32's largest number ({FLOAT32_MAX:.4g}) and would act as "
                                 "infinity")
        return value

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(explain(e, self.path)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# pydantic's error types, in words; {names} are filled from the error's context.
_WORDS = {
    "greater_than_equal": "must be ≥ {ge}", "greater_than": "must be > {gt}", "less_than_equal": "must be ≤ {le}",
    "less_than": "must be < {lt}", "literal_error": "must be one of {expected}", "tuple_type": "must be a list",
    "too_short": "must have at least {min_length} item(s)", "too_long": "must have at most {max_length} items",
    "int_type": "must be an integer", "float_type": "must be a number", "finite_number": "must be a finite number",
    "bool_type": "must be true or false", "string_type": "must be a string", "model_type": "must be a JSON object",
    "string_unicode": "must be text (a name whose bytes are not UTF-8 cannot be recorded in config.json)",
}


def explain(error: ValidationError, prefix: str = "") -> str:
    """The first problem of a pydantic error as one line: ``field.path: must be ..., got X``."""
    e = error.errors()[0]
    loc = ".".join(((prefix,) if prefix else ()) + tuple(p for p in e["loc"] if isinstance(p, str)))
    kind, got = e["type"], e.get("input")
    if kind == "extra_forbidden":
        return f"unknown config key {loc}"
    if kind == "missing" and isinstance(e["loc"][-1], int):  # a pair given as a list of one
        return f"{loc}: must have exactly 2 items"
    if kind == "string_too_short":
        return f"{loc}: must not be empty"
    if kind == "value_error":
        return f"{loc or 'config'}: {e['msg'].removeprefix('Value error, ')}"
    what = _WORDS[kind].format(**(e.get("ctx") or {})) if kind in _WORDS else f"must be valid ({e['msg']})"
    shown = repr(got)  # a value can be a file's worth: the line quotes its start
    return f"{loc}: {what}, got {shown if len(shown) <= 80 else shown[:80] + '…'}"
