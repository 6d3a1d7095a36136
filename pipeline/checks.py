"""Value rules that need nothing else of the package: ranges of numbers, strict booleans, ``None``'s spellings.

Library modules and the bundle layer both use them; this module imports nothing of ``pipeline``
(``tests/test_imports.py`` says so), so any module may import it.
"""

from __future__ import annotations

import math
from typing import Any


def _check(name: str, value: Any, low: float | None, high: float | None, low_open: bool, high_open: bool, integer: bool) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        return f"{name}={value!r} must be {'an integer' if integer else 'a number'}"
    if math.isnan(value) or math.isinf(value):
        return f"{name}={value!r} must be finite"
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if lo_ok and hi_ok:
        return None
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    return f"{name}={value!r} is out of range; valid: {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"


#: name: (low, high, low_open, high_open, integer)
RANGES: dict[str, tuple] = {
    "learning_rate": (0, None, True, False, False),
    "momentum": (0, 1, False, True, False),
    "num_epochs": (1, None, False, False, True),
    "batch_size": (1, None, False, False, True),
    "val_interval": (1, None, False, False, True),
    "ckpt_interval": (1, None, False, False, True),
    "log_interval": (1, None, False, False, True),
    "dropout": (0, 1, False, True, False),
    "lr_power": (0, None, False, False, False),
    "elastic_prob": (0, 1, False, False, False),
    "elastic_sigma": (0, None, False, False, False),
    "weight_w0": (0, None, False, False, False),
    "weight_sigma": (0, None, True, False, False),
    "num_workers": (0, None, False, False, True),
    "n_workers": (1, None, False, False, True),
    "threads_per_worker": (1, None, False, False, True),
    "threshold": (0, 1, False, False, False),
    "num_val": (0, None, False, False, True),
    "num_images": (1, None, False, False, True),
    "train_minutes": (0, None, True, False, False),
}


def optional(value: Any) -> Any:
    """``None`` for the ways a command line spells it (``null``, ``none``, any case; MONAI's CLI
    passes ``--key null`` on as the string ``"null"``), any other value unchanged."""
    return None if isinstance(value, str) and value.strip().lower() in ("null", "none") else value


def check_hyperparameters(**values: Any) -> None:
    """Raise ``ValueError`` listing every value outside its range in :data:`RANGES` (``None`` is skipped).

    >>> check_hyperparameters(learning_rate=-0.01)
    Traceback (most recent call last):
    ValueError: invalid hyper-parameter(s): learning_rate=-0.01 is out of range; valid: (0, inf]
    """
    errors = []
    for name, value in values.items():
        if name not in RANGES:
            raise KeyError(f"no range is defined for {name!r}; known: {', '.join(RANGES)}")
        error = _check(name, value, *RANGES[name])
        if error:
            errors.append(error)
    if errors:
        raise ValueError("invalid hyper-parameter(s): " + "; ".join(errors))


#: the spellings a boolean key accepts on the command line or in a config file
FLAG_WORDS = {"true": True, "True": True, "1": True, "false": False, "False": False, "0": False}


def flags(**values: Any) -> dict[str, bool]:
    """Parse boolean config keys strictly: ``true/false/True/False/1/0`` (strings, ints or bools).

    ``python -m monai.bundle`` hands ``--overwrite false`` to the config as the *string*
    ``'false'``, which Python treats as true; every boolean key of the bundle configs goes
    through this one function instead (``flags: "$pipeline.checks.flags(overwrite=@overwrite)"``,
    used as ``$@flags['overwrite']``).

    Returns:
        ``{key: bool}`` in the order given.

    Raises:
        ValueError: listing every key whose value is none of the accepted spellings.

    >>> flags(overwrite="false", resume=1)
    {'overwrite': False, 'resume': True}
    """
    parsed, errors = {}, []
    for key, value in values.items():
        if isinstance(value, bool):
            parsed[key] = value
        elif isinstance(value, (str, int)) and str(value) in FLAG_WORDS:
            parsed[key] = FLAG_WORDS[str(value)]
        else:
            errors.append(f"--{key} {value!r}")
    if errors:
        raise ValueError(
            f"not a boolean: {', '.join(errors)}; valid values are true or false (also True, False, 1, 0)"
        )
    return parsed
