"""`TrainConfig(threat=...)`: the trainer trains against any Threat, and a checkpoint keeps it."""

from __future__ import annotations

import pytest
import torch

import lirpa_patch  # noqa: F401  (shims before auto_LiRPA)
from lirpa_patch import PatchThreat, SparseThreat, UsageError
from lirpa_patch.models.adapter import ImageModel
from lirpa_patch.models.architectures import build_architecture
from lirpa_patch.train import Trainer, TrainConfig
from lirpa_patch.train.config import config_dict, config_from_dict
from lirpa_patch.train.strategies import EveryRow, RandomLocations
from tests.toy_threats import RegionPatch
from toy_models import NUM_CLASSES, toy_images

SIZE = 8


@pytest.fixture(scope="module")
def toy():
    x, y = toy_images(96, size=SIZE, seed=5)
    return x[:64], y[:64], x[64:], y[64:]


def _mlp(seed: int = 0) -> ImageModel:
    torch.manual_seed(seed)
    return ImageModel(build_architecture("mlp", 1, SIZE, NUM_CLASSES, width=32), image_shape=(1, SIZE, SIZE))


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=2, warmup_start=0, warmup=1, lr=5e-3, batch_size=32, eval_every=0, seed=0),
                          **kw})


def test_a_sparse_threat_trains_exactly_as_the_sparse_field(toy):
    x, y, _, _ = toy
    by_threat, by_field = _mlp(), _mlp()
    Trainer(by_threat, _config(threat=SparseThreat(2)), x, y).fit()
    Trainer(by_field, _config(sparse=2), x, y).fit()
    for a, b in zip(by_threat.parameters(), by_field.parameters()):
        assert torch.equal(a, b)  # the same computations in the same process


def test_a_patch_threat_trains_exactly_as_the_patch_fields(toy):
    x, y, _, _ = toy
    by_threat, by_field = _mlp(), _mlp()
    Trainer(by_threat, _config(threat=PatchThreat("3x3", "diamond"), strategy="random", patches=3), x, y).fit()
    Trainer(by_field, _config(patch="3x3", shape="diamond", strategy="random", patches=3), x, y).fit()
    for a, b in zip(by_threat.parameters(), by_field.parameters()):
        assert torch.equal(a, b)


def test_a_threat_without_locations_trains_on_every_row(toy):
    x, y, _, _ = toy
    trainer = Trainer(_mlp(), _config(threat=SparseThreat(2)), x, y)
    assert isinstance(trainer.strategy, EveryRow) and trainer.locations is None


def test_a_new_threat_with_locations_trains_with_the_strategy_over_its_locations(toy):
    x, y, vx, vy = toy
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[: SIZE // 2] = True
    threat = RegionPatch(2, region)
    trainer = Trainer(_mlp(), _config(threat=threat, strategy="random", patches=2), x, y, vx, vy)
    assert isinstance(trainer.strategy, RandomLocations)
    assert len(trainer.locations) == threat.rows_per_image == 3 * 7
    trainer.fit()
    result = trainer.evaluate()
    assert result.threat_model is threat and result.num_locations == 21


def test_a_checkpoint_keeps_the_threat(toy):
    for threat in (PatchThreat("3x3", "diamond"), SparseThreat(4)):
        back = config_from_dict(config_dict(_config(threat=threat))).threat
        assert type(back) is type(threat) and back.describe() == threat.describe()


def test_a_checkpoint_without_a_threat_trains_against_its_patch_fields():
    config = config_from_dict({"patch": "5x5", "shape": "line", "strategy": "all"})
    assert config.threat is None and config.threat_model().label == "5x5 line"


def test_a_config_refuses_a_threat_and_a_sparse_budget_together():
    with pytest.raises(UsageError, match="threat= or sparse="):
        TrainConfig(threat=SparseThreat(2), sparse=2)


def test_a_config_refuses_a_threat_that_is_not_one():
    with pytest.raises(UsageError, match="Threat"):
        TrainConfig(threat="k=4")


def test_a_checkpoint_naming_an_unknown_threat_fails_in_one_line():
    with pytest.raises(UsageError, match="unknown threat 'region-patch'"):
        config_from_dict({"threat": {"threat": "region-patch", "size": 2}})
