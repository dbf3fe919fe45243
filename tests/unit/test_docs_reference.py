"""The docs' generated configuration reference (docs/_ext/atropos_reference.py) lists every key of the typed
``atropos`` block with its documentation, and the metrics page names every ``atropos/`` metric the code writes, so
neither can drift. Sphinx is not needed: the generator parses the dataclasses' source and the base YAML."""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
METRICS_PAGE = ROOT / "docs" / "reference" / "metrics.rst"


def _generator():
    spec = importlib.util.spec_from_file_location("atropos_reference", ROOT / "docs" / "_ext" / "atropos_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("atropos_reference", module)
    spec.loader.exec_module(module)
    return module


ref = _generator()


def yaml_keys(block: dict, prefix: str = "atropos") -> set[str]:
    """Every dotted key of a YAML mapping, nested mappings included (and their own key)."""
    keys = set()
    for name, value in block.items():
        dotted = f"{prefix}.{name}"
        keys.add(dotted)
        if isinstance(value, dict) and dotted not in ("atropos.mixture",):  # mixture: a free-form name -> weight map
            keys |= yaml_keys(value, dotted)
    return keys


def test_the_comment_parser_on_a_small_yaml() -> None:
    text = """
a:
  # first line
  # second line
  b: 1

  c: 2  # no comment above: not documented

  d:
    # inner
    e: null
"""
    assert ref.yaml_comments(text) == {"a.b": "first line second line", "a.d.e": "inner"}


def test_the_reference_lists_exactly_the_keys_of_the_base_yaml_each_documented() -> None:
    base = yaml.safe_load(ref.BASE_YAML.read_text())["atropos"]
    keys = ref.all_keys()
    generated = {k.key for k in keys if "[]" not in k.key}
    assert generated == yaml_keys(base)
    undocumented = [k.key for k in keys if not k.doc.strip()]
    assert not undocumented, f"keys without a comment in atropos_grpo_base.yaml or the dataclass: {undocumented}"
    entries = [k for k in keys if k.key.startswith("atropos.launcher.envs[].")]  # read from the envs comment's list
    assert {"atropos.launcher.envs[].script", "atropos.launcher.envs[].servers"} <= {k.key for k in entries}
    assert next(k for k in entries if k.key.endswith(".weight")).doc.startswith("--env.group_size / --env.inference")


def test_the_defaults_shown_are_the_yaml_ones() -> None:
    base = yaml.safe_load(ref.BASE_YAML.read_text())["atropos"]
    by_key = {k.key: k for k in ref.all_keys()}
    assert by_key["atropos.max_policy_lag"].default == str(base["max_policy_lag"]) == "2"
    assert by_key["atropos.inference.api_key"].default == "null" and base["inference"]["api_key"] is None
    assert by_key["atropos.launcher.envs[].group_size"].default == "8"
    assert by_key["atropos.launcher.envs"].type == "list[EnvConfig]"


def test_the_rendered_reference_has_a_row_per_key() -> None:
    text = ref.config_reference_rst()
    for section in ref.config_sections():
        for key in section.keys:
            assert f"   * - ``{key.key[len(section.prefix) + 1 :]}``" in text, key.key
    assert "(undocumented)" not in text


def _expand(text: str) -> str:
    """``a/{b,c}`` -> ``a/b a/c`` (the brace lists the metrics page uses)."""

    def one(match: re.Match) -> str:
        head, options, tail = match.group(1), match.group(2).split(","), match.group(3)
        return " ".join(f"{head}{o}{tail}" for o in options)

    for _ in range(3):
        text = re.sub(r"([\w/<>.]*)\{([\w,]+)\}([\w/<>.]*)", one, text)
    return text


def test_the_metrics_page_names_every_metric_the_code_writes() -> None:
    page = _expand(METRICS_PAGE.read_text())
    families = {m.group(1) for m in re.finditer(r"``(atropos/[\w/]*)\*``", page)}  # e.g. atropos/distill/*
    names = ref.metric_names()
    assert "atropos/policy_lag_mean" in names and "atropos/env/<name>/fraction" in names  # the scan finds them
    named = set(re.findall(r"``([^`\s]+)``", page)) | set(re.findall(r"(atropos/[\w/<>]+)", page))

    def on_page(name: str) -> bool:  # a field (<name>, <k>) in the code's name matches any text on the page
        pattern = "".join(
            r"[^`\s]+" if part.startswith("<") else re.escape(part) for part in re.split(r"(<\w+>)", name)
        )
        return any(re.fullmatch(pattern, n) for n in named) or any(name.startswith(f) for f in families)

    missing = [name for name in names if not on_page(name)]
    assert not missing, f"metrics the code writes that docs/reference/metrics.rst does not name: {missing}"


def test_brace_expansion() -> None:
    assert _expand("``a/{b,c}``") == "``a/b a/c``"
    assert list(itertools.islice(_expand("x/{p,q}_s").split(), 2)) == ["x/p_s", "x/q_s"]
