"""Tests of the bundle configs as pipeline.config and pipeline.checks read them: every boolean key goes
through the flags component, and a config reads like a recipe (no programs in it)."""

import re

import pytest
import yaml

from conftest import CONFIGS, ROOT


def config_strings(tree, path=""):
    """``(id, value)`` of every string in a config tree, ids spelt as MONAI's (``a#b#0``)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        here = f"{path}#{key}" if path else str(key)
        if isinstance(value, str):
            yield here, value
        else:
            yield from config_strings(value, here)


@pytest.mark.parametrize("name", ["train.yaml", "multi_gpu_train.yaml", "inference.yaml", "evaluate.yaml"])
def test_every_boolean_key_is_read_through_flags(name):
    """A boolean key is only ever used as @flags['key']: its raw value is read by the flags component alone."""
    own = yaml.safe_load((CONFIGS / name).read_text())
    merged = yaml.safe_load((CONFIGS / "train.yaml").read_text()) if name == "multi_gpu_train.yaml" else {}
    merged.update(own)
    flag_args = merged["flags"]
    assert flag_args["_target_"] == "pipeline.checks.flags"
    booleans = [k for k, v in merged.items() if "#" not in k and (isinstance(v, bool) or k in ("amp", "resume", "streaming"))]
    assert booleans, name
    for key in booleans:
        assert flag_args.get(key) == f"@{key}", f"{name}: boolean key {key} is not parsed by flags"
        uses = [where for where, value in config_strings(own) if re.search(rf"@{key}\b", value) and not where.startswith("flags#")]
        assert not uses, f"{name}: raw boolean @{key} used outside flags: {uses}"
    parsed = {k for f in ("train.yaml", "inference.yaml", "evaluate.yaml") for k in yaml.safe_load((CONFIGS / f).read_text())["flags"]}
    for overlay in (ROOT / "configs").glob("*.yaml"):  # overlays set values only; the entry config that uses them parses them
        for key, value in yaml.safe_load(overlay.read_text()).items():
            if isinstance(value, bool):
                assert key in parsed, (overlay, key)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")) + sorted(f"overlay/{p.name}" for p in (ROOT / "configs").glob("*.yaml")))
def test_configs_read_like_recipes(name):
    """No program in a config: no $ expression over 120 characters (a call with many arguments is a component),
    no handler referred to by its position (@handlers#1), no sleeps; the pre-flight checks list names its checks."""
    path = ROOT / "configs" / name.split("/")[1] if name.startswith("overlay/") else CONFIGS / name
    tree = yaml.safe_load(path.read_text()) or {}
    for where, value in config_strings(tree):
        if value.startswith("$"):
            assert len(value) <= 120, f"{name}: {where} is a {len(value)}-character expression: {value[:80]}..."
        assert not re.search(r"@[\w#]*#\d", value), f"{name}: {where} refers to a list item by position: {value}"
        assert "sleep" not in value, f"{name}: {where} sleeps: {value}"
    for check in tree.get("checks", []):
        assert check.startswith("@") or check.count(",") <= 4, f"{name}: the check {check!r} spells its arguments; make it a component"
