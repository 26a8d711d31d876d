"""The background checkpoint writer on its own: what it writes is the state at save time, whatever
training does to the tensors (and to live dicts) while the file is still being written; a failed
write surfaces as one error at the next wait(). The whole save path, 2 ranks, is in test_pretrain
(resume bit-exact) and test_faults (ranks killed inside saves)."""
from __future__ import annotations

import threading

import pytest
import torch

from pipeline.checkpoint.writer import BackgroundWriter
from pipeline.errors import PipelineError


def held_back_saves(monkeypatch) -> threading.Event:
    """torch.save on the writer thread waits until the returned event is set."""
    gate, real_save = threading.Event(), torch.save

    def save(*args, **kwargs):
        assert gate.wait(30), "the test never released the writer"
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return gate


def test_a_background_save_writes_the_state_as_it_was_at_save_time(tmp_path, monkeypatch):
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    group = {"lr": 0.1, "params": [0]}
    state = {"module": {"embed.weight": weight.detach(), "lm_head.weight": weight.detach()},  # tied
             "optimizer": {"state": {0: {"exp_avg": weight[1].clone()}}, "param_groups": [group]},
             "shapes": [torch.Size([3, 4])], "step": 7}
    gate = held_back_saves(monkeypatch)
    writer = BackgroundWriter(background=True)
    path = tmp_path / "model_states.pt"
    writer.save(state, str(path))
    weight.add_(100.0)  # training goes on: in-place updates, and the schedule sets a new lr
    state["optimizer"]["state"][0]["exp_avg"].zero_()
    group["lr"] = 0.2
    assert not path.exists()  # still queued: nothing under the final name yet
    gate.set()
    writer.wait()
    saved = torch.load(path, weights_only=True)
    assert torch.equal(saved["module"]["embed.weight"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert saved["module"]["embed.weight"].data_ptr() == saved["module"]["lm_head.weight"].data_ptr()
    assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], torch.tensor([4.0, 5.0, 6.0, 7.0]))
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert saved["shapes"] == [torch.Size([3, 4])] and saved["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["model_states.pt"]  # no temp file left
    size, digest = writer.written[str(path)]
    assert size == path.stat().st_size and len(digest) == 64


def test_without_background_the_file_is_written_before_save_returns(tmp_path):
    writer = BackgroundWriter(background=False, digests=False)
    path = tmp_path / "optim_states.pt"
    writer.save({"w": torch.ones(3)}, str(path))
    assert path.is_file() and writer.written[str(path)] == (path.stat().st_size, None)
    writer.wait()


def test_a_failed_write_is_one_error_at_the_next_wait(tmp_path):
    writer = BackgroundWriter(background=True)
    ran = []
    writer.save({"w": torch.ones(3)}, str(tmp_path / "model_states.pt"))  # written, but its save is lost
    writer.save({"w": torch.ones(3)}, str(tmp_path / "missing-folder" / "optim_states.pt"))
    writer.submit(lambda: ran.append("commit"))  # the save's later jobs are dropped: no commit
    with pytest.raises(PipelineError, match="writing a checkpoint failed: .*missing-folder"):
        writer.wait()
    assert ran == []
    writer.save({"w": torch.ones(3)}, str(tmp_path / "next.pt"))  # the next save starts clean
    writer.wait()
    assert (tmp_path / "next.pt").is_file() and list(writer.written) == [str(tmp_path / "next.pt")]
