"""JsonlGroupSource: saved groups in step batches — order, shuffle, carry, bad lines, epochs, resume (values by hand).

Files are written with atroposlib's own writer (``BaseEnv.handle_send_to_api`` with ``data_path_to_save_groups``)
where the format matters, and as plain JSON lines (the same format) elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipe.atropos.schema import GroupValidationError
from recipe.atropos.setup.assets import build_tiny_model
from recipe.atropos.sources.jsonl import JsonlGroupSource, OfflineDataError, offline_training_steps
from recipe.atropos.transport.client import AtroposClient
from tests.factories import TINY_CONFIG, X
from tests.helpers import save_with_atroposlib


def group(gid: int, size: int, score: float = 0.0) -> dict:
    """A valid group whose every sequence starts with token ``gid`` (its id in these tests)."""
    return {
        "tokens": [[gid, 5, 6 + i] for i in range(size)],
        "masks": [[X, 5, 6 + i] for i in range(size)],
        "scores": [score + i for i in range(size)],
    }


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def ids(groups: list) -> list[int]:
    return [g.tokens[0][0] for g in groups]


def test_file_order_whole_groups_exact_batches_and_carry(tmp_path: Path) -> None:
    # sizes 4, 2, 4, 2, 2, 2 with batch 8: [1, 2] (6) + 3 does not fit → carried; 4 fills; next step: 3, 5, 6
    sizes = {1: 4, 2: 2, 3: 4, 4: 2, 5: 2, 6: 2}
    path = write(tmp_path / "g.jsonl", [group(g, n) for g, n in sizes.items()])
    source = JsonlGroupSource([str(path)], batch_size=8)
    assert ids(source.next_batch()) == [1, 2, 4]
    assert source.metrics()["atropos/offline/carried_groups"] == 1.0
    assert ids(source.next_batch()) == [3, 5, 6]
    assert source.metrics()["atropos/offline/groups_read"] == 6.0


def test_globs_are_sorted_and_files_read_in_order(tmp_path: Path) -> None:
    write(tmp_path / "b.jsonl", [group(3, 4), group(4, 4)])
    write(tmp_path / "a.jsonl", [group(1, 4), group(2, 4)])
    source = JsonlGroupSource([str(tmp_path / "*.jsonl")], batch_size=8)
    assert ids(source.next_batch()) == [1, 2] and ids(source.next_batch()) == [3, 4]
    with pytest.raises(OfflineDataError, match="matches no file"):
        JsonlGroupSource([str(tmp_path / "*.json")], batch_size=8)


def test_shuffle_is_seeded_per_epoch_and_each_epoch_is_a_permutation(tmp_path: Path) -> None:
    path = write(tmp_path / "g.jsonl", [group(g, 2) for g in range(1, 9)])

    def two_epochs(seed: int) -> list[int]:
        source = JsonlGroupSource([str(path)], batch_size=4, shuffle=True, seed=seed)
        return [i for _ in range(8) for i in ids(source.next_batch())]

    first = two_epochs(7)
    assert first == two_epochs(7)
    assert sorted(first[:8]) == list(range(1, 9)) and sorted(first[8:]) == list(range(1, 9))
    assert first[:8] != first[8:] and first[:8] != list(range(1, 9))
    assert first != two_epochs(8)


def test_bad_lines_are_rejected_counted_and_kept_once(tmp_path: Path) -> None:
    bad_masks = group(2, 2)
    bad_masks["masks"][1] = [X, 5]
    lines = [group(1, 2), "{not json", bad_masks, group(3, 3), group(4, 2), "", [1, 2]]
    path = write(tmp_path / "g.jsonl", lines)
    rejected = tmp_path / "rejected.jsonl"
    source = JsonlGroupSource([str(path)], batch_size=4, rejected_groups_file=str(rejected))
    assert ids(source.next_batch()) == [1, 4]
    metrics = source.metrics()
    assert metrics["atropos/offline/rejected_lines"] == 4.0
    for field in ("json", "masks", "group_size", "group"):
        assert metrics[f"atropos/offline/rejected_lines/{field}"] == 1.0
    records = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert [r["source"] for r in records] == [f"{path}:{n}" for n in (2, 3, 4, 7)]
    assert records[1]["group"] == bad_masks and "sequence 1" in records[1]["reason"]
    assert "data.train_batch_size=4 is not a multiple" in records[2]["reason"]
    # a resumed run indexes the files again but does not append the same rejections twice
    resumed = JsonlGroupSource([str(path)], batch_size=4, rejected_groups_file=str(rejected))
    resumed.load_state_dict(source.state_dict())
    assert ids(resumed.next_batch()) == [1, 4]  # second epoch
    assert len(rejected.read_text().splitlines()) == 4


def test_only_bad_lines_fail_naming_the_files(tmp_path: Path) -> None:
    path = write(tmp_path / "g.jsonl", ["{", "[]"])
    with pytest.raises(OfflineDataError, match="no valid group"):
        JsonlGroupSource([str(path)], batch_size=4)


def test_the_trainers_rejected_groups_file_is_accepted(tmp_path: Path) -> None:
    # The live client's own rejection log writes the record; a group rejected for a reason since fixed trains again.
    rejected = tmp_path / "rejected.jsonl"
    client = AtroposClient("http://127.0.0.1:1", rejected_groups_file=str(rejected))
    client.rejected.reject(group(9, 2), GroupValidationError("scores", "example reason"))
    source = JsonlGroupSource([str(rejected)], batch_size=2)
    assert ids(source.next_batch()) == [9]


def test_epochs_bound_the_steps_and_running_out_is_an_error(tmp_path: Path) -> None:
    # 5 groups of 2 = 10 sequences per pass; batch 4 → 2 passes hold 20 sequences = 5 steps
    path = write(tmp_path / "g.jsonl", [group(g, 2) for g in range(1, 6)])
    source = JsonlGroupSource([str(path)], batch_size=4, epochs=2)
    assert source.steps_available() == 5
    batches = [ids(source.next_batch()) for _ in range(5)]
    assert batches == [[1, 2], [3, 4], [5, 1], [2, 3], [4, 5]]
    with pytest.raises(OfflineDataError, match="ran out after atropos.offline.epochs=2"):
        source.next_batch()
    assert offline_training_steps(None, JsonlGroupSource([str(path)], batch_size=4, epochs=2)) == 5
    assert offline_training_steps(3, JsonlGroupSource([str(path)], batch_size=4, epochs=2)) == 3
    assert offline_training_steps(9, JsonlGroupSource([str(path)], batch_size=4, epochs=2)) == 5
    assert offline_training_steps(9, JsonlGroupSource([str(path)], batch_size=4)) == 9
    with pytest.raises(OfflineDataError, match="total_training_steps or atropos.offline.epochs"):
        offline_training_steps(None, JsonlGroupSource([str(path)], batch_size=4))


def test_unfillable_batch_sizes_fail_instead_of_looping(tmp_path: Path) -> None:
    path = write(tmp_path / "g.jsonl", [group(1, 4), group(2, 6)])
    with pytest.raises(OfflineDataError, match="cannot fill a batch of 12"):
        JsonlGroupSource([str(path)], batch_size=12).next_batch()


def test_resume_continues_at_the_next_unread_group_with_the_carry(tmp_path: Path) -> None:
    sizes = [4, 2, 4, 2, 2, 2, 4, 4, 2, 2, 4]
    path = write(tmp_path / "g.jsonl", [group(g, n) for g, n in enumerate(sizes, start=1)])
    reference = JsonlGroupSource([str(path)], batch_size=8, shuffle=True, seed=3)
    expected = [ids(reference.next_batch()) for _ in range(5)]

    first = JsonlGroupSource([str(path)], batch_size=8, shuffle=True, seed=3)
    assert [ids(first.next_batch()) for _ in range(2)] == expected[:2]
    saved = tmp_path / "data.pt"
    torch.save(first.state_dict(), saved)  # as verl's _save_checkpoint does
    resumed = JsonlGroupSource([str(path)], batch_size=8, shuffle=True, seed=3)
    resumed.load_state_dict(torch.load(saved, weights_only=False))
    assert [ids(resumed.next_batch()) for _ in range(3)] == expected[2:]
    assert len(resumed) == 0  # verl's epoch-boundary check never skips the restore

    other = JsonlGroupSource([str(path)], batch_size=8, shuffle=True, seed=4)
    with pytest.raises(OfflineDataError, match="differ from the checkpoint"):
        other.load_state_dict(first.state_dict())
    with pytest.raises(OfflineDataError, match="not jsonl"):
        other.load_state_dict({"source": "atropos"})


@pytest.mark.timeout(120)
def test_reads_what_atroposlibs_writer_saves(tmp_path: Path) -> None:
    """Groups go through BaseEnv.handle_send_to_api with data_path_to_save_groups (what `process` does)."""
    written = [dict(group(1, 2), inference_logprobs=[[1.0, -0.5, -0.25]] * 2, overrides=[{}, {}]), group(2, 2)]
    written[1]["advantages"] = [[0.0, 0.5, 0.5], [0.0, -0.5, -0.5]]
    save_with_atroposlib(build_tiny_model(tmp_path / "tiny"), tmp_path / "g.jsonl", written)

    source = JsonlGroupSource([str(tmp_path / "g.jsonl")], batch_size=4)
    got = source.next_batch()
    assert ids(got) == [1, 2]
    assert got[0].inference_logprobs == [[1.0, -0.5, -0.25]] * 2
    assert got[1].advantages == [[0.0, 0.5, 0.5], [0.0, -0.5, -0.5]]
    assert source.metrics()["atropos/offline/rejected_lines"] == 0.0


def test_config_checks_for_offline_mode(tmp_path: Path) -> None:
    from recipe.atropos.config import check_atropos_config
    from recipe.atropos.launcher.config import load_config
    from recipe.atropos.sources.jsonl import make_jsonl_source

    path = write(tmp_path / "g.jsonl", [group(g, 4) for g in range(1, 5)])
    common = ["actor_rollout_ref.model.path=/m", "atropos.source=jsonl", f"atropos.jsonl_paths=[{path}]"]
    config = load_config(TINY_CONFIG, [*common, "trainer.total_training_steps=null", "atropos.offline.epochs=3"])
    atropos = check_atropos_config(config)  # epochs end the run: no total_training_steps needed
    source = make_jsonl_source(atropos, batch_size=int(config.data.train_batch_size))
    assert source.epochs == 3 and source.batch_size == 8 and offline_training_steps(None, source) == 6
    with pytest.raises(ValueError, match="total_training_steps is required"):
        check_atropos_config(load_config(TINY_CONFIG, [*common, "trainer.total_training_steps=null"]))
    with pytest.raises(ValueError, match="needs atropos.jsonl_paths"):
        check_atropos_config(load_config(TINY_CONFIG, ["actor_rollout_ref.model.path=/m", "atropos.source=jsonl"]))
    with pytest.raises(ValueError, match="atropos.source='disk'"):
        check_atropos_config(load_config(TINY_CONFIG, ["actor_rollout_ref.model.path=/m", "atropos.source=disk"]))


def test_the_launcher_refuses_offline_mode_naming_the_entry_point() -> None:
    from recipe.atropos.launcher.config import LaunchError
    from recipe.atropos.launcher.supervisor import Launcher

    with pytest.raises(LaunchError, match="recipe.atropos.main_atropos"):
        Launcher(TINY_CONFIG, ["atropos.source=jsonl", "atropos.jsonl_paths=[x.jsonl]"])
