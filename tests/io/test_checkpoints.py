"""Checkpoints: tensors plus latest.json written last; optimiser state of any kind round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from fmbseg.errors import InputError
from fmbseg.io.checkpoints import (
    LATEST_FILE,
    flatten_optimizer,
    flatten_state,
    load_latest,
    load_optimizer,
    save_checkpoint,
    unflatten_state,
)


def _stepped(optimizer_class: type[torch.optim.Optimizer], **options: float):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = optimizer_class(model.parameters(), lr=0.1, **options)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize(
    ("optimizer_class", "options"),
    [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.AdamW, {"weight_decay": 0.01})],
)
def test_model_and_optimizer_state_round_trip_through_a_checkpoint(
    tmp_path, optimizer_class, options
):
    model, optimizer = _stepped(optimizer_class, **options)
    moments, groups = flatten_optimizer("opt", optimizer)
    save_checkpoint(
        tmp_path,
        "epoch_002.safetensors",
        flatten_state("model", model.state_dict()) | moments,
        {"epoch": 2, "groups": groups},
    )

    loaded = load_latest(tmp_path)
    assert loaded is not None
    tensors, record = loaded
    assert record["epoch"] == 2 and record["tensors"] == "epoch_002.safetensors"
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = optimizer_class(fresh.parameters(), lr=0.5, **options)
    fresh.load_state_dict(unflatten_state("model", tensors))
    load_optimizer("opt", fresh_optimizer, tensors, record["groups"])

    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)
    before, after = optimizer.state_dict(), fresh_optimizer.state_dict()
    # JSON stores Adam's betas tuple as a list, which the optimiser reads alike.
    assert after["param_groups"] == json.loads(json.dumps(before["param_groups"]))
    assert before["state"].keys() == after["state"].keys()
    for index, entry in before["state"].items():
        assert entry.keys() == after["state"][index].keys()
        for field, value in entry.items():
            assert torch.equal(after["state"][index][field], value), field


def test_a_save_keeps_only_its_own_tensors_file(tmp_path):
    for epoch in (1, 2):
        save_checkpoint(tmp_path, f"epoch_{epoch:03d}.safetensors", {"x": torch.ones(2)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_002.safetensors", LATEST_FILE]


def test_loading_removes_a_tensors_file_a_kill_left_behind(tmp_path):
    save_checkpoint(tmp_path, "step_0000004.safetensors", {"x": torch.ones(2)}, {"step": 4})
    (tmp_path / "step_0000008.safetensors").write_bytes(b"written before the kill")
    tensors, record = load_latest(tmp_path)
    assert record["step"] == 4 and torch.equal(tensors["x"], torch.ones(2))
    assert not (tmp_path / "step_0000008.safetensors").exists()


def test_no_checkpoint_is_none(tmp_path):
    assert load_latest(tmp_path) is None


def test_a_tensors_file_whose_sha256_differs_is_refused(tmp_path):
    save_checkpoint(tmp_path, "epoch_001.safetensors", {"x": torch.ones(2)}, {})
    record = json.loads((tmp_path / LATEST_FILE).read_text(encoding="utf-8"))
    save_checkpoint(tmp_path, "epoch_001.safetensors", {"x": torch.zeros(2)}, {})
    (tmp_path / LATEST_FILE).write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(InputError, match="sha256 differs"):
        load_latest(tmp_path)
