"""Request fields in the proto3 JSON mapping, as Google's REST APIs read them.

A field may be named in lowerCamelCase (``trainingDatasetUri``) or as the proto names it
(``training_dataset_uri``, as seed 004's curl example does); an enum value by its name
(``"ADAPTER_SIZE_FOUR"``) or its number (``2``: the SDK asks for ``$alt=json;enum-encoding=int``);
an int64 as a string (``"3"``, as the SDK sends it) or a number; numbers in strings are ASCII
(Python's ``int()`` and ``float()`` would take "３" too) and every number is finite. Each refusal
is an ApiError 400 that names the field.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

from service.http_api import ApiError, check_fields

INTEGER = re.compile(r"-?[0-9]{1,19}")  # matched whole, as every pattern here
DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
INT64_RANGE = range(-2**63, 2**63)


def camel(name: str) -> str:
    """``training_dataset_uri`` -> ``trainingDatasetUri`` (a lowerCamelCase name stays)."""
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def message(value: object, known: Iterable[str], where: str) -> dict:
    """The JSON object ``value`` with its field names in lowerCamelCase; ApiError 400 when it is
    not an object, names a field twice or names fields not in ``known``."""
    if not isinstance(value, dict):
        raise ApiError(400, f"{where} must be an object, not {type(value).__name__}")
    fields: dict = {}
    for name, item in value.items():
        if camel(name) in fields:
            raise ApiError(400, f"{where} names the field {camel(name)} twice")
        fields[camel(name)] = item
    check_fields(fields, set(known), where)
    return fields


def enum(value: object, numbers: dict[str, int], where: str) -> str:
    """The name of an enum value given by name or number."""
    if isinstance(value, str) and value in numbers:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        for name, number in numbers.items():
            if number == value:
                return name
    raise ApiError(400, f"{where}: {value!r} is not one of {', '.join(numbers)} (or their "
                        f"numbers {', '.join(map(str, numbers.values()))})")


def int64(value: object, where: str) -> int:
    """An int64 given as a number or an ASCII decimal string."""
    number = None
    if isinstance(value, str) and INTEGER.fullmatch(value.strip()):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    if number is None or number not in INT64_RANGE:
        raise ApiError(400, f"{where} must be an integer (int64), not {_show(value)}")
    return number


def double(value: object, where: str) -> float:
    """A finite double given as a number or an ASCII decimal string."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) or \
            isinstance(value, str) and DECIMAL.fullmatch(value.strip()):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any double
            pass
    if number is None or not math.isfinite(number):
        raise ApiError(400, f"{where} must be a finite number, not {_show(value)}")
    return number


def string(value: object, where: str, limit: int) -> str:
    """A string field's value, of at most ``limit`` characters."""
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise ApiError(400, f"{where} has {len(value)} characters; at most {limit} are accepted")
    return value


def _show(value: object, limit: int = 60) -> str:
    """``value`` for a message, cut at ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
