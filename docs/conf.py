"""Sphinx configuration of the atropos-verl docs (`make docs`: warnings are errors)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))  # atropos_reference: the generated configuration and metrics reference
sys.path.insert(0, str(DOCS.parent))  # recipe.atropos for autodoc

project = "atropos-verl"
author = "atropos-verl contributors"
copyright = "2026, atropos-verl contributors"  # noqa: A001 - Sphinx's name

extensions = ["sphinx.ext.autodoc", "atropos_reference"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"description": "GRPO online RL in verl on Atropos environments", "fixed_sidebar": True}
html_static_path: list[str] = []
# Links to verl, torch, pydantic and OmegaConf types in signatures are not resolved (no intersphinx: no network).
nitpicky = True
# Docstrings name internal objects (``:meth:`...CompletionLedger.sequence_version```) that these pages do not document:
# only the public API is autodoc'ed (reference/api.rst), so such Python cross-references are left unresolved. Every
# :ref: and :doc: link between the pages is still checked (-n -W).
nitpick_ignore_regex = [
    (r"py:.*", r"(verl|torch|omegaconf|pydantic|tensordict|numpy|atroposlib|ray|recipe)(\..*)?"),
    (r"py:class", r"(DataProto|DictConfig|Tensor|BaseModel|ScoredData|optional|Path|SequenceLookup)"),
    (r"py:class", r"(dict|list|tuple)\[.*"),
    (r"py:(class|obj|data)", r".*(Any|Callable|Iterable|Iterator|Mapping|Sequence|Protocol|Self)"),
]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
suppress_warnings: list[str] = []
