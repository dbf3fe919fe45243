"""The environments' interpreter (``.venv-envs``: atroposlib 0.4.0, transformers 4.x) and real env layouts in it.

- atroposlib's ``tokenize_for_trainer`` returns lists of ids there (under the trainer's transformers 5 it returns a
  ``BatchEncoding`` as tokens), and the tokenizers this project saves with transformers 5 (the tests' tiny model, the
  demo's SmolLM2 conversion) load there with the same ids and chat template;
- the probe (recipe/atropos/launcher/env_probe.py) reads what ``config_init`` declares, in that interpreter, for a
  one-server env, a two-server env (policy + judge) and a module inside a package reached through ``pythonpath``;
- each env's ``serve`` accepts the command line the launcher builds (``env_argv``) and ends up with the servers and
  flags the launcher meant: the env is run up to where it would start its loop (its ``env_manager`` replaced, in
  the test's process only, by one that prints the merged config), so no API or endpoint is needed;
- and served for real (a real ``run-api``, the real endpoint over a scripted stand-in for the model), each layout
  posts trainable groups from that interpreter, its requests counted under its name at the endpoint.

Skipped, naming the fix, when ``.venv-envs`` does not exist (``make install`` builds it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from recipe.atropos.config import EnvConfig, LauncherConfig
from recipe.atropos.endpoint.backends import Completion, SamplingParams
from recipe.atropos.endpoint.server import InferenceEndpoint
from recipe.atropos.launcher.env_entries import EnvProbeError, EnvServers, env_argv, env_environ, probe_envs
from recipe.atropos.launcher.env_python import DEFAULT_VENV, TRANSFORMERS_PIN, venv_python
from recipe.atropos.launcher.preflight import PreflightError, check_envs
from recipe.atropos.launcher.processes import ManagedProcess
from recipe.atropos.rundir import RunDir
from recipe.atropos.setup.assets import portable_tokenizer, prepare_smollm2, save_portable_tokenizer
from recipe.atropos.transport.client import AtroposClient
from tests.helpers import run_at_once, wait_until

ROOT = Path(__file__).resolve().parents[2]
ENVS_PY = str(venv_python(DEFAULT_VENV))
TEST_ENVS = ROOT / "tests" / "envs"
STOCK = ROOT.parent / "shared" / "stock-envs"
ONE_WORD = EnvConfig(module="recipe.atropos.envs.one_word_env")
TWO_SERVERS = EnvConfig(script=str(TEST_ENVS / "two_servers_env.py"))
PKG = EnvConfig(module="pkg_env.env", pythonpath=[str(TEST_ENVS)])
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What colour is the sky? Answer in exactly one word."},
    {"role": "assistant", "content": "Blue"},
]

pytestmark = pytest.mark.skipif(
    not Path(ENVS_PY).exists(), reason=f"{DEFAULT_VENV} is absent: run `make install` (or env_python) to build it"
)

# What a tokenizer gives for CHAT, printed as JSON: run by both interpreters and compared.
TOKENIZER_FACTS = """
import json, sys, transformers
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
chat = json.loads(sys.argv[2])
ids = tok.apply_chat_template(chat)
facts = {
    "version": transformers.__version__,
    "ids_type": type(ids).__name__,
    "ids": ids if isinstance(ids, list) else list(ids["input_ids"]),
    "prompt": tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True),
    "special": [tok.eos_token, tok.eos_token_id, tok.pad_token, tok.bos_token, len(tok)],
    "encode": tok.encode("hello world <|im_end|>"),
}
if len(sys.argv) > 3:
    from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer
    out = tokenize_for_trainer(tok, chat)
    facts["trainer"] = {k: [type(out[k]).__name__, out[k] if isinstance(out[k], list) else repr(out[k])[:80]]
                        for k in ("tokens", "masks")}
print("FACTS " + json.dumps(facts))
"""

# `serve` up to the env's loop: the env class (found as the probe finds it) gets an env_manager that prints what
# atroposlib merged (env config, servers) instead of starting; the rest of `serve` is atroposlib's own.
SERVE_CONFIG = """
import json, sys
from recipe.atropos.launcher.env_probe import env_class, load_module, load_script
kind, target, *rest = sys.argv[1:]
module, source = load_script(target) if kind == "script" else load_module(target)
cls = env_class(module, source)
async def report(self):
    servers = [s.config.model_dump(mode="json") for s in self.server.servers]
    print("SERVE " + json.dumps({"env": self.config.model_dump(mode="json"), "servers": servers,
                                 "server_class": type(self.server.servers[0]).__name__}), flush=True)
cls.env_manager = report
sys.argv = [target, *rest]
cls.cli()
"""


def run_envs_python(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ENVS_PY, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def tagged_json(done: subprocess.CompletedProcess, tag: str) -> dict:
    for line in done.stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    raise AssertionError(f"no {tag} line (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def tokenizer_facts(model_dir: Path, with_trainer: bool = False) -> tuple[dict, dict]:
    """What the tokenizer in ``model_dir`` gives in the env interpreter (transformers 4) and in the trainer's (5),
    both interpreters run at once (each spends its time importing transformers)."""
    args = [TOKENIZER_FACTS, str(model_dir), json.dumps(CHAT), *(["trainer"] if with_trainer else [])]
    done = run_at_once({"four": [ENVS_PY, "-c", *args], "five": [sys.executable, "-c", *args]}, timeout=180)
    return tagged_json(done["four"], "FACTS"), tagged_json(done["five"], "FACTS")


@pytest.fixture(scope="module")
def tiny_facts(tiny_model: Path) -> tuple[dict, dict]:
    """The tiny test tokenizer (saved by transformers 5) seen by the env interpreter and by the trainer's."""
    return tokenizer_facts(tiny_model, with_trainer=True)


def test_the_env_interpreter_has_transformers_4_and_tokenize_for_trainer_returns_lists(tiny_facts) -> None:
    envs, trainer = tiny_facts
    assert envs["version"] == TRANSFORMERS_PIN and envs["ids_type"] == "list"
    tokens_type, tokens = envs["trainer"]["tokens"]
    masks_type, masks = envs["trainer"]["masks"]
    assert (tokens_type, masks_type) == ("list", "list")
    assert tokens == envs["ids"] and len(masks) == len(tokens)
    prompt_len = masks.count(-100)
    assert 0 < prompt_len < len(tokens) and masks[prompt_len:] == tokens[prompt_len:]  # the reply is trained
    assert masks[:prompt_len] == [-100] * prompt_len
    # The trainer's interpreter (transformers 5) is where the stock envs break: tokens come back as a BatchEncoding.
    assert trainer["version"].startswith("5.") and trainer["ids_type"] == "BatchEncoding"
    assert trainer["trainer"]["tokens"][0] == "BatchEncoding"


def test_the_tiny_test_tokenizer_saved_by_transformers_5_reads_the_same_under_4(tiny_model: Path, tiny_facts) -> None:
    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # not transformers 5's TokenizersBackend
    four, five = tiny_facts
    for key in ("ids", "prompt", "special", "encode"):
        assert four[key] == five[key], key


def test_the_demo_tokenizer_saved_by_transformers_5_reads_the_same_under_4(tmp_path: Path) -> None:
    """The demo's SmolLM2 tokenizer as ``prepare_smollm2`` saves it (from the GGUF, by transformers 5)."""
    from transformers import AutoTokenizer

    from recipe.atropos.setup.assets import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except (RuntimeError, FileNotFoundError) as exc:
        pytest.skip(f"the demo model is not installed: {exc}")
    save_portable_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), tmp_path / "smollm2")
    four, five = tokenizer_facts(tmp_path / "smollm2")
    assert four["version"] == TRANSFORMERS_PIN and five["version"].startswith("5.")
    for key in ("ids", "prompt", "special", "encode"):
        assert four[key] == five[key], key


def test_a_demo_model_converted_before_the_fix_is_repaired_in_place(tmp_path: Path) -> None:
    cached = tmp_path / "SmolLM2-135M-Instruct"
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    (cached / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "x": 1}))
    assert prepare_smollm2(tmp_path) == cached  # found in the cache: not converted again, the tokenizer repaired
    assert json.loads((cached / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "x": 1,
    }
    assert portable_tokenizer(tmp_path / "nowhere") == tmp_path / "nowhere"  # no tokenizer: nothing to do


@pytest.fixture(scope="module")
def probed() -> dict[str, EnvServers]:
    """One probe per layout, in the env interpreter: a one-server module, a two-server script, a package module."""
    envs = {"one_word": ONE_WORD, "two_servers": TWO_SERVERS, "pkg": PKG}
    return probe_envs(envs, dict.fromkeys(envs, ENVS_PY))


def test_the_probe_reads_what_config_init_declares_in_the_env_interpreter(probed: dict[str, EnvServers]) -> None:
    assert (probed["one_word"].env_class, len(probed["one_word"].servers)) == ("OneWordEnv", 1)
    assert not probed["one_word"].multi and not probed["pkg"].multi
    two = probed["two_servers"]
    assert two.env_class == "TwoServersEnv" and two.multi
    assert [s["model_name"] for s in two.servers] == ["policy", "judge"]
    assert two.servers[1]["health_check"] is False and two.servers[1]["api_key"] == "judge-key"
    assert probed["pkg"].env_class == "PkgEnv"  # its relative import of .helpers works through `pythonpath`


def test_our_envs_run_there_without_the_trainers_dependencies(probed: dict[str, EnvServers]) -> None:
    done = run_envs_python("-c", "import importlib.util as u; print([bool(u.find_spec(m)) for m in ('torch', 'verl')])")
    assert done.stdout.strip() == "[False, False]"  # no torch, no verl in .venv-envs ...
    assert probed["one_word"].env_class == "OneWordEnv"  # ... yet the bundled env (recipe.atropos) imports there


def test_a_package_env_without_its_pythonpath_is_refused_naming_the_fix() -> None:
    with pytest.raises(EnvProbeError, match="module 'pkg_env.env' is not importable .* add its folder to `pythonpath`"):
        probe_envs({"pkg": EnvConfig(module="pkg_env.env")}, {"pkg": ENVS_PY})
    launcher = LauncherConfig(envs=[EnvConfig(name="pkg", module="pkg_env.env")], env_python=ENVS_PY)
    with pytest.raises(PreflightError) as info:
        check_envs(launcher)
    assert str(info.value).startswith("atropos.launcher.envs[0] (pkg): module 'pkg_env.env' is not importable")
    assert ENVS_PY in str(info.value) and "\n" not in str(info.value)


def test_preflight_refuses_an_entry_that_does_not_fit_what_config_init_declares() -> None:
    entry = EnvConfig(name="judged", script=TWO_SERVERS.script, args={"openai.timeout": 5})
    with pytest.raises(PreflightError) as info:
        check_envs(LauncherConfig(envs=[entry], env_python=ENVS_PY))
    assert str(info.value) == (
        "atropos.launcher.envs[0] (judged): declares 2 servers: atroposlib refuses --openai.* flags then; move args "
        "openai.timeout into `servers` (a dict per server index)"
    )


@pytest.mark.skipif(not STOCK.is_dir(), reason=f"the stock Atropos envs are not at {STOCK}")
def test_a_stock_env_imports_in_the_env_interpreter_as_a_script() -> None:
    launcher = LauncherConfig(
        envs=[EnvConfig(name="blackjack", script=str(STOCK / "blackjack_env_no_thinking.py"))], env_python=ENVS_PY
    )
    found = check_envs(launcher)  # the interpreter imports atroposlib, the script imports there (gymnasium)
    assert found["blackjack"].env_class == "BlackjackEnvNoThinking" and not found["blackjack"].multi


def serve_configs(runs: dict[str, tuple[EnvConfig, list[str]]]) -> dict[str, dict]:
    """What atroposlib's ``serve`` merges from each ``argv`` (the launcher's command line, interpreter first), by
    name; the envs' interpreters run at once."""
    commands = {}
    for name, (_, argv) in runs.items():
        assert argv[0] == ENVS_PY
        target = ["module", argv[2]] if argv[1] == "-m" else ["script", argv[1]]
        rest = argv[3:] if argv[1] == "-m" else argv[2:]
        commands[name] = [ENVS_PY, "-c", SERVE_CONFIG, *target, *rest]
    envs = {name: env_environ(env, ENVS_PY) for name, (env, _) in runs.items()}
    done = run_at_once(commands, timeout=180, envs=envs)
    return {name: tagged_json(done[name], "SERVE") for name in runs}


def launcher_argv(name: str, env: EnvConfig, servers: EnvServers, model: Path, config_dir: Path) -> list[str]:
    return env_argv(
        name,
        env,
        api_url="http://127.0.0.1:1",
        inference_url="http://127.0.0.1:2",
        model=str(model),
        max_token_length=200,
        max_policy_lag=2,
        api_key="tok",
        python=ENVS_PY,
        servers=servers,
        config_dir=config_dir,
    )


def test_serve_takes_the_launchers_command_line_for_each_layout(
    tiny_model: Path, tmp_path: Path, probed: dict[str, EnvServers]
) -> None:
    # The judge's client (vllm, as servers[0]'s) loads a tokenizer at start: the entry names one it can load offline.
    two = EnvConfig(script=TWO_SERVERS.script, group_size=2, servers=[{}, {"tokenizer_name": str(tiny_model)}])
    envs = {"one_word": ONE_WORD, "two_servers": two, "pkg": PKG}
    merged = serve_configs(
        {name: (env, launcher_argv(name, env, probed[name], tiny_model, tmp_path)) for name, env in envs.items()}
    )
    for name, env in envs.items():
        policy = merged[name]["servers"][0]
        assert policy["base_url"] == f"http://127.0.0.1:2/env/{name}/v1"
        assert policy["server_type"] == "vllm" and merged[name]["server_class"] == "VLLMServer"
        assert policy["model_name"] == policy["tokenizer_name"] == str(tiny_model) and policy["api_key"] == "tok"
        config = merged[name]["env"]
        assert config["tokenizer_name"] == str(tiny_model) and config["rollout_server_url"] == "http://127.0.0.1:1"
        assert config["max_token_length"] == 200 and config["wandb_name"] == name
        assert config["group_size"] == env.group_size  # --env.* flags still apply beside a --config YAML
    assert [len(merged[name]["servers"]) for name in envs] == [1, 2, 1]
    judge = merged["two_servers"]["servers"][1]
    assert (judge["model_name"], judge["base_url"], judge["api_key"]) == ("judge", "http://127.0.0.1:9/v1", "judge-key")
    assert judge["tokenizer_name"] == str(tiny_model)  # the entry's `servers` dict, merged onto the declared judge
    assert merged["two_servers"]["servers"][0]["timeout"] == 600  # the declared policy's own fields are kept
    written = yaml.safe_load((tmp_path / "two_servers.yaml").read_text())
    assert merged["two_servers"]["servers"] == written["openai"]  # atroposlib took the list as written, field by field


def test_the_old_command_line_is_what_atroposlib_refuses_for_a_two_server_env(tiny_model: Path) -> None:
    """--openai.* flags for a two-server env: atroposlib exits 2 (why the launcher passes --config instead)."""
    old = launcher_argv("two", TWO_SERVERS, EnvServers(servers=[{}]), tiny_model, Path("/nowhere"))  # as one server
    assert "--openai.base_url" in old
    done = run_envs_python("-c", SERVE_CONFIG, "script", old[1], *old[2:])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "SERVE " not in done.stdout and "not supported" in done.stdout + done.stderr


class OneWordThenMore:
    """Stand-in for the policy: completions alternate between a one-word reply and a longer one."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer, self.calls = tokenizer, 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        self.calls += 1
        ids = [*self.tokenizer.encode("Blue" if self.calls % 2 else "It is blue", add_special_tokens=False)]
        ids.append(self.tokenizer.eos_token_id)
        return Completion(token_ids=ids, log_probs=[-0.5] * len(ids), finish_reason="stop")


def test_each_layout_serves_and_posts_trainable_groups_from_the_env_interpreter(
    run_api, tiny_model: Path, tmp_path: Path, probed: dict[str, EnvServers], no_leftovers: list[ManagedProcess]
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    endpoint = InferenceEndpoint(
        OneWordThenMore(tok),
        port=0,
        max_tokens_cap=16,
        eos_token_ids=[tok.eos_token_id],
        tokenizer=tok,
        served_model_name=str(tiny_model),
    ).start()
    client = AtroposClient(run_api.url)
    client.register(batch_size=8, max_token_len=512, starting_step=0, num_steps=100)
    keep = {"env.ensure_scores_are_not_same": False}
    envs = {
        "one_word": EnvConfig(module=ONE_WORD.module, group_size=4, args=keep),
        "two_servers": EnvConfig(
            script=TWO_SERVERS.script, group_size=4, servers=[{}, {"tokenizer_name": str(tiny_model)}], args=keep
        ),
        "pkg": EnvConfig(module=PKG.module, pythonpath=PKG.pythonpath, group_size=4, args=keep),
    }
    groups = []
    try:
        for name, env in envs.items():
            argv = env_argv(
                name,
                env,
                api_url=run_api.url,
                inference_url=endpoint.url,
                model=str(tiny_model),
                max_token_length=256,
                max_policy_lag=2,
                python=ENVS_PY,
                servers=probed[name],
                config_dir=RunDir(tmp_path).env_configs,
            )
            proc = ManagedProcess(name, argv, tmp_path / f"{name}.log", env=env_environ(env, ENVS_PY)).start()
            no_leftovers.append(proc)

        def three_envs_posted() -> bool:
            groups.extend(client.get_batch() or [])
            return len({g.env_id for g in groups}) == 3

        wait_until(three_envs_posted, 240, "a group from each of the three envs")
        served = requests.get(f"{endpoint.url}/health", timeout=5).json()["stats"]["envs"]
    finally:
        for proc in no_leftovers:
            proc.stop()
        endpoint.stop()
    assert all(served[name]["completions"] > 0 for name in envs), served  # counted under /env/<name>
    for group in groups:
        assert group.scores and set(group.scores) <= {0.0, 1.0}
        for tokens, masks in zip(group.tokens, group.masks, strict=True):
            assert len(tokens) == len(masks) and all(isinstance(t, int) for t in tokens)
            first = next(i for i, m in enumerate(masks) if m != -100)  # the prompt is masked, the reply trained
            assert 0 < first and masks[first:] == tokens[first:]
            assert tok.decode(tokens[first:]).startswith(("Blue", "It is blue"))
