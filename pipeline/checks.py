"""Value rules that need nothing else of the package: ranges of numbers, strict booleans, ``None``'s spellings.

Library modules and the bundle layer both use them; this module imports nothing of ``pipeline``
(``tests/test_imports.py`` says so), so any module may import it.
"""

from __future__ import annotations

import math
from typing import Any


#: an interval -> the values it bounds (``int``: integers only); messages quote the interval as written here
INTERVALS: dict[str, tuple[str, ...]] = {
    "(0, inf]": ("learning_rate", "weight_sigma", "train_minutes"),
    "[0, inf]": ("lr_power", "elastic_sigma", "weight_w0"),
    "[0, 1)": ("momentum", "dropout"),
    "[0, 1]": ("elastic_prob", "threshold"),
    "int [1, inf]": ("num_epochs", "batch_size", "val_interval", "ckpt_interval", "log_interval", "n_workers",
                     "threads_per_worker", "num_images"),
    "int [0, inf]": ("num_workers", "num_val"),
}
#: name -> its interval (:data:`INTERVALS`)
RANGES: dict[str, str] = {name: interval for interval, names in INTERVALS.items() for name in names}


def _check(name: str, value: Any, interval: str) -> str | None:
    """Why ``value`` is not in ``interval`` (``"[0, 1)"``, ``"int [1, inf]"``), or None."""
    if value is None:
        return None
    integer, spec = interval.startswith("int "), interval.removeprefix("int ")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        return f"{name}={value!r} must be {'an integer' if integer else 'a number'}"
    if math.isnan(value) or math.isinf(value):
        return f"{name}={value!r} must be finite"
    low, high = (float(v) for v in spec[1:-1].split(", "))
    lo_ok = value > low if spec[0] == "(" else value >= low
    hi_ok = value < high if spec[-1] == ")" else value <= high
    return None if lo_ok and hi_ok else f"{name}={value!r} is out of range; valid: {spec}"


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
        error = _check(name, value, RANGES[name])
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
