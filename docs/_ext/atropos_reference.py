"""The configuration and metrics reference, generated from the code so it cannot drift.

- :func:`config_sections`: every key of the ``atropos:`` block, read from the typed dataclasses in
  ``recipe/atropos/config/atropos_config.py`` (names, types, defaults, nesting) and documented by the comments above
  each key in ``recipe/atropos/config/atropos_grpo_base.yaml`` (else the field's own comment in the dataclass). The
  source is parsed, not imported: no verl, torch or Ray is loaded, so the docs build and its unit test stay fast.
- :func:`metric_names`: every ``atropos/...`` metric name written as a string literal in ``recipe/atropos``.

As a Sphinx extension it adds two directives, ``.. atropos-config-reference::`` and ``.. atropos-metric-index::``.
``tests/unit/test_docs_reference.py`` checks the first against the YAML and the second against the metrics page.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PY = ROOT / "recipe" / "atropos" / "config" / "atropos_config.py"
BASE_YAML = ROOT / "recipe" / "atropos" / "config" / "atropos_grpo_base.yaml"
RECIPE = ROOT / "recipe" / "atropos"
TOP = "AtroposConfig"


@dataclass(frozen=True)
class Key:
    """One configuration key: ``key`` dotted under ``atropos`` (``launcher.envs[].name`` for env entries)."""

    key: str
    type: str
    default: str
    doc: str


@dataclass(frozen=True)
class Section:
    """One dataclass of the block: its keys' prefix (``atropos.inference``), class name, docstring and keys."""

    prefix: str
    cls: str
    doc: str
    keys: tuple[Key, ...]


# ---------------------------------------------------------------- YAML comments


def yaml_comments(text: str) -> dict[str, str]:
    """Dotted key (``atropos.inference.port``) -> the comment lines right above it in ``text``, joined.

    Also reads the ``envs`` block's list of an entry's keys (``#   name: ...``, continuation lines indented deeper)
    as ``atropos.launcher.envs[].<key>``."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(raw)
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w]*):", raw)
        if not match:
            pending = []
            continue
        indent, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [name])
        stack.append((indent, name))
        lines = [line.strip()[1:].strip() for line in pending]
        if dotted == "atropos.launcher.envs":
            docs.update(_entry_keys(pending))
            lines = [line for line in lines if line][:1]  # the block's first line; its keys are documented apart
        if any(lines):
            docs[dotted] = " ".join(line for line in lines if line)
        pending = []
    return docs


def _entry_keys(comment_lines: list[str]) -> dict[str, str]:
    """``#   key (default), key2: text`` items of the envs comment -> ``atropos.launcher.envs[].key``: text."""
    docs: dict[str, str] = {}
    current: list[str] = []
    text: list[str] = []

    def flush() -> None:
        for key in current:
            docs[f"atropos.launcher.envs[].{key}"] = " ".join(text)

    for raw in comment_lines:
        body = raw.strip()[1:]
        item = re.match(r"^   (\w+(?: \([^)]*\))?(?:, \w+(?: \([^)]*\))?)*): (.*)$", body)
        if item:
            flush()
            current = [re.sub(r" \(.*\)$", "", part) for part in item.group(1).split(", ")]
            text = [item.group(2).strip()]
        elif current and body.startswith("     "):
            text.append(body.strip())
        else:
            flush()
            current, text = [], []
    flush()
    return docs


# ---------------------------------------------------------------- dataclasses


def _field_comments(source: str) -> dict[int, str]:
    """Line number -> the comment at the end of that line."""
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string[1:].strip()
    return comments


def _default(value: ast.expr | None, classes: dict[str, ast.ClassDef]) -> tuple[str, str | None]:
    """(the default as YAML shows it, the nested dataclass's name or None)."""
    if value is None:
        return "required", None
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for kw in value.keywords:
            if kw.arg == "default_factory":
                name = ast.unparse(kw.value)
                if name in classes:
                    return "", name
                return {"list": "[]", "dict": "{}"}.get(name, f"{name}()"), None
            if kw.arg == "default":
                return _default(kw.value, classes)
    if isinstance(value, ast.Constant):
        v = value.value
        if v is None:
            return "null", None
        if isinstance(v, bool):
            return str(v).lower(), None
        return str(v), None
    return ast.unparse(value), None


def config_sections(config_py: Path = CONFIG_PY, base_yaml: Path = BASE_YAML) -> list[Section]:
    """The ``atropos:`` block as sections, one per dataclass, in the order the fields nest (depth first)."""
    source = config_py.read_text()
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    comments = _field_comments(source)
    yaml_docs = yaml_comments(base_yaml.read_text())
    sections: list[Section] = []

    def walk(cls: str, prefix: str) -> None:
        node = classes[cls]
        keys: list[Key] = []
        nested: list[tuple[str, str]] = []
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            name = stmt.target.id
            typ = ast.unparse(stmt.annotation)
            default, child = _default(stmt.value, classes)
            dotted = f"{prefix}.{name}"
            if child is None and typ.startswith("list[") and typ[5:-1] in classes:
                child = typ[5:-1]  # a list of entries: documented as <key>[].<field>
                nested.append((child, f"{dotted}[]"))
            elif child is not None:
                nested.append((child, dotted))
                default = f"see ``{dotted}.*``"
            doc = yaml_docs.get(dotted) or comments.get(stmt.lineno, "")
            if not doc and child is not None:
                doc = " ".join((ast.get_docstring(classes[child]) or "").split())
            if not doc and keys and re.search(rf"\b{name}\b", keys[-1].doc):
                doc = f"See ``{keys[-1].key[len(prefix) + 1 :]}`` above."  # documented with the key before it
            keys.append(Key(dotted, typ, default, doc))
        sections.append(Section(prefix, cls, ast.get_docstring(node) or "", tuple(keys)))
        for child, child_prefix in nested:
            walk(child, child_prefix)

    walk(TOP, "atropos")
    return sections


def all_keys(sections: list[Section] | None = None) -> list[Key]:
    return [key for section in sections or config_sections() for key in section.keys]


# ---------------------------------------------------------------- metrics


METRIC = re.compile(r"""f?["'](atropos/[A-Za-z0-9_/{}.]*)["']""")


def metric_names(root: Path = RECIPE) -> dict[str, list[str]]:
    """``atropos/...`` metric names written as literals in ``root`` -> the files (relative to the repository) that
    write them. f-string fields become ``<field>``; names that end in ``/`` or are only a field are prefixes of
    families named elsewhere and are left out."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for match in METRIC.finditer(path.read_text()):
            name = re.sub(r"\{(\w+)[^}]*\}", r"<\1>", match.group(1))
            if name.endswith("/") or re.fullmatch(r"atropos/<\w+>", name):
                continue
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return {name: sorted(files) for name, files in sorted(found.items())}


# ---------------------------------------------------------------- reStructuredText


def _rst_text(text: str) -> str:
    """Comment text as inline reStructuredText: `code` -> ``code``, the other markup characters escaped."""
    text = re.sub(r"\bNone = ", "null = ", text.replace("``", "`"))  # dataclass comments say None for YAML's null
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 2:
            out.append(f"``{part[1:-1]}``")
            continue
        part = part.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|")
        part = re.sub(r"(\w)_(?=\W|$)", r"\1\\_", part)  # foo_ would be a link target
        out.append(part)
    return "".join(out)


def config_reference_rst(sections: list[Section] | None = None) -> str:
    """One titled table per dataclass: key, type, default, what it does."""
    lines: list[str] = []
    for section in sections or config_sections():
        title = f"``{section.prefix}``" if section.prefix == "atropos" else f"``{section.prefix}.*``"
        anchor = "config-" + re.sub(r"[^a-z0-9]+", "-", section.prefix.lower()).strip("-")
        lines += [f".. _{anchor}:", "", title, "~" * (len(title) + 2), ""]
        lines += [f"``{section.cls}``: {_rst_text(' '.join(section.doc.split()))}", ""]
        lines += [".. list-table::", "   :header-rows: 1", "   :widths: 28 16 14 42", ""]
        lines += ["   * - key", "     - type", "     - default", "     - what it does"]
        for key in section.keys:
            short = key.key[len(section.prefix) + 1 :]
            default = key.default if key.default.startswith("see ") else f"``{key.default}``"
            lines += [
                f"   * - ``{short}``",
                f"     - ``{key.type}``",
                f"     - {default}",
                f"     - {_rst_text(key.doc) if key.doc else '(undocumented)'}",
            ]
        lines.append("")
    return "\n".join(lines)


def metric_index_rst(names: dict[str, list[str]] | None = None) -> str:
    names = metric_names() if names is None else names
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 45 55", "", "   * - metric", "     - written in"]
    for name, files in names.items():
        lines += [f"   * - ``{name}``", "     - " + ", ".join(f"``{f}``" for f in files)]
    return "\n".join(lines) + "\n"


def setup(app):  # pragma: no cover - exercised by `make docs`
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective
    from sphinx.util.nodes import nested_parse_with_titles

    class _Generated(SphinxDirective):
        def render(self) -> str:
            raise NotImplementedError

        def run(self):
            from docutils import nodes

            for path in (CONFIG_PY, BASE_YAML):
                self.env.note_dependency(str(path))
            container = nodes.container()
            lines = StringList(self.render().splitlines(), source=self.get_source_info()[0])
            nested_parse_with_titles(self.state, lines, container)
            return container.children

    class ConfigReference(_Generated):
        def render(self) -> str:
            return config_reference_rst()

    class MetricIndex(_Generated):
        def render(self) -> str:
            return metric_index_rst()

    app.add_directive("atropos-config-reference", ConfigReference)
    app.add_directive("atropos-metric-index", MetricIndex)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
