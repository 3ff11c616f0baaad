"""Stage hooks (``train/hooks.py``): the registry builds the hooks a stage's objectives need, and
``StageHooks`` drives them, merges their inputs and logs, and saves and restores their state."""
import importlib
from pathlib import Path

import pytest
import torch

from imagebert_ds.model.objectives import REGISTRY
from imagebert_ds.train.hooks import STAGE_HOOKS, StageHooks, build_stage_hooks, missing_methods

REPO = Path(__file__).resolve().parents[2]


class RecordingHook:
    """Records every call; its input key and log key carry the objective's name."""

    def __init__(self, options, *, data_cfg, rank, world, device, seed):
        self.options, self.ctx = options, (data_cfg, rank, world, device, seed)
        self.steps: list[int] = []
        self.count = 0

    def on_step(self, step, model):
        self.steps.append(step)

    def batch_inputs(self, model, batch):
        self.count += 1
        return {f"{self.options}_input": torch.full((len(batch["x"]),), self.count)}

    def pop_log(self):
        return {f"{self.options}/count": self.count}

    def state_dict(self):
        return {"steps": list(self.steps), "count": self.count}

    def load_state_dict(self, state):
        self.steps, self.count = list(state["steps"]), state["count"]


class NoLogHook(RecordingHook):
    pop_log = None


_FAKE = {"a": f"{__name__}:RecordingHook", "b": f"{__name__}:RecordingHook"}


def _build(objectives, registry=_FAKE):
    return build_stage_hooks(objectives, "data", 1, 2, torch.device("cpu"), 7, registry)


def test_registry_builds_the_stage_objectives_hooks_only():
    hooks = _build({"b": "b", "mlm": "mlm"})
    assert list(hooks.hooks) == ["b"]
    assert hooks.hooks["b"].options == "b"
    assert hooks.hooks["b"].ctx == ("data", 1, 2, torch.device("cpu"), 7)
    assert _build({"mlm": "mlm"}).hooks == {}


def test_hooks_are_driven_together():
    hooks = _build({"a": "a", "b": "b"})
    hooks.on_step(3, None)
    inputs = hooks.batch_inputs(None, {"x": [0, 1]})
    assert set(inputs) == {"a_input", "b_input"} and inputs["a_input"].tolist() == [1, 1]
    assert hooks.pop_log() == {"a/count": 1, "b/count": 1}
    assert all(h.steps == [3] for h in hooks.hooks.values())


def test_state_round_trip_and_checkpoints_from_before_hooks():
    hooks = _build({"a": "a", "b": "b"})
    for step in range(3):
        hooks.on_step(step, None)
        hooks.batch_inputs(None, {"x": [0]})
    rank_state = {"loader": {}, "hooks": hooks.state_dict()}
    fresh = _build({"a": "a", "b": "b"})
    fresh.load_state_dict(rank_state)
    assert fresh.state_dict() == hooks.state_dict() == {
        "a": {"steps": [0, 1, 2], "count": 3}, "b": {"steps": [0, 1, 2], "count": 3}}
    # written before stage hooks: each state at the top level under its objective's name
    legacy = _build({"a": "a"})
    legacy.load_state_dict({"loader": {}, "a": {"steps": [5], "count": 9}})
    assert legacy.state_dict() == {"a": {"steps": [5], "count": 9}}
    with pytest.raises(KeyError, match="'b' stage hook"):
        _build({"b": "b"}).load_state_dict({"loader": {}, "hooks": {"a": {}}})


def test_errors_name_the_hook():
    with pytest.raises(TypeError, match=r"'a' \(NoLogHook\) lacks \['pop_log'\]"):
        _build({"a": "a"}, {"a": f"{__name__}:NoLogHook"})
    clash = StageHooks({"a": RecordingHook("x", data_cfg=0, rank=0, world=1, device=0, seed=0),
                        "b": RecordingHook("x", data_cfg=0, rank=0, world=1, device=0, seed=0)})
    with pytest.raises(RuntimeError, match="'b' gives inputs \\['x_input'\\]"):
        clash.batch_inputs(None, {"x": [0]})


def test_shipped_registry_names_objectives_and_hooks_that_exist():
    for name, target in STAGE_HOOKS.items():
        assert name in REGISTRY, name
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        assert not missing_methods(cls), (name, missing_methods(cls))
    assert missing_methods(NoLogHook) == ["pop_log"]


def test_trainer_names_no_objective_with_a_hook():
    src = (REPO / "imagebert_ds" / "train" / "trainer.py").read_text()
    for name in STAGE_HOOKS:
        assert name not in src, name
