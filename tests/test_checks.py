"""Tests of pipeline.checks: the parser of the boolean keys (flags)."""

import re

import pytest

from pipeline import checks


# ------------------------------------------------------------------ booleans
def test_flags_accept_the_six_spellings_and_nothing_else():
    words = {"true": True, "True": True, "1": True, 1: True, True: True,
             "false": False, "False": False, "0": False, 0: False, False: False}
    for value, expected in words.items():
        assert checks.flags(overwrite=value) == {"overwrite": expected}
    for bad in ("yes", "TRUE", "no", "", 2, 1.0, None, "t"):
        with pytest.raises(ValueError, match=re.escape(f"not a boolean: --overwrite {bad!r}")):
            checks.flags(overwrite=bad)
    with pytest.raises(ValueError, match=r"--tta 'on', --resume 'off'"):  # every bad key at once
        checks.flags(tta="on", resume="off", streaming="false")
