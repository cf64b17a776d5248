"""Issue 23: resume survives torn writes (a label line cut by a kill) and keeps the report's figures (shards)."""

from __future__ import annotations

import pytest
import torch

from adaflex.retrofit import io
from adaflex.retrofit.routes.config import RoutesConfig
from adaflex.retrofit.routes.label import label_all, load_examples
from tiny import byte_tokenizer, tiny_llama

ARC = "../shared/data/arc_easy_train.jsonl"


def test_drop_torn_tail(tmp_path):
    f = tmp_path / "log.jsonl"
    f.write_text('{"a": 1}\n{"a": 2}\n{"a"')
    io.drop_torn_tail(f)
    assert f.read_text() == '{"a": 1}\n{"a": 2}\n'
    f.write_text('{"a"')
    io.drop_torn_tail(f)
    assert f.read_text() == ""


def test_torn_label_line_is_redone_on_the_next_run(tmp_path, one_thread):
    model, tok = tiny_llama(), byte_tokenizer()
    base = dict(examples=3, simulations=3, train=[ARC], max_tokens=32)
    exs = load_examples(RoutesConfig(**base), tok, [ARC], seed=0)
    full = label_all(model, exs, RoutesConfig(**base), tmp_path / "a", "fp", 0, log=lambda m: None)
    f = tmp_path / "a" / "labels-0-of-1.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second record
    again = label_all(model, exs, RoutesConfig(**base), tmp_path / "a", "fp", 0, log=lambda m: None)
    assert [r["index"] for r in again] == [0, 1, 2]
    assert [r["label"] for r in again] == [r["label"] for r in full]
    assert len(f.read_text().splitlines()) == 3


@pytest.mark.parametrize("cut", [5])
def test_resumed_heal_keeps_holdout_before_and_counts_all_tokens(tmp_path, cut):
    from adaflex.retrofit.drop.apply import apply as drop_apply
    from adaflex.retrofit.drop.plan import DropPlan
    from adaflex.retrofit.shards.config import ShardsConfig
    from adaflex.retrofit.shards.train import heal
    from tests.shards.helpers import adapt

    def setup():
        torch.manual_seed(0)
        teacher, student = tiny_llama(), tiny_llama()
        drop_apply(student, DropPlan(num_layers=4, kept=[0, 1, 2], removed=[3], block_influence=[0.0] * 4))
        settings = {"method": "mos", "rank": 4, "equivalent_rank": 2, "shards_per_vector": 4, "dropout": 0.0}
        adapt(student, random_b=False, **settings)
        cfg = ShardsConfig(**settings, steps=8, lr=1e-2, batch_size=4, checkpoint_every=4)
        return student, cfg, lambda _w, ids: teacher(input_ids=ids, use_cache=False).logits

    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    hold = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    student, cfg, teacher = setup()
    whole = heal(student, windows, cfg, teacher, seed=3, state_dir=tmp_path / "w", fingerprint="f", holdout=hold)
    student, cfg, teacher = setup()
    calls = {"n": 0}

    def dying(which, ids):
        calls["n"] += 1
        if calls["n"] == 1 + cut + 1:  # the holdout pass, then `cut` steps: the checkpoint of step 4 is on disk
            raise KeyboardInterrupt
        return teacher(which, ids)

    with pytest.raises(KeyboardInterrupt):
        heal(student, windows, cfg, dying, seed=3, state_dir=tmp_path / "c", fingerprint="f", holdout=hold)
    student, cfg, teacher = setup()
    resumed = heal(student, windows, cfg, teacher, seed=3, state_dir=tmp_path / "c", fingerprint="f", holdout=hold)
    assert resumed["resumed_at"] == 4
    assert resumed["holdout_loss_before"] == pytest.approx(whole["holdout_loss_before"])
    assert resumed["train_tokens"] == whole["train_tokens"] == 8 * 4 * 32
