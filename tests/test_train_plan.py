"""lirpa_patch.train.plan: a training run's data selection, configuration and architecture,
from options (a new run) or from a checkpoint (a continued one)."""

from __future__ import annotations

import pytest
import torch

from lirpa_patch.errors import UsageError
from lirpa_patch.train import (
    TrainConfig,
    plan_from_checkpoint,
    plan_from_options,
    train_val_split,
)
from lirpa_patch.train.plan import Warmup, scaled_warmup
from lirpa_patch.train.splits import SELECTION_KEYS

SAMPLE = {"data": "sample", "num": 40, "val_num": 8}
"""A small selection: 40 of the bundled training digits (28 x 28, 10 classes), 8 held-out ones to validate."""
SIZE, NUM_CLASSES = 28, 10
SMALL = dict(architecture="mlp", width=4, patch="2x2", patches=1, epochs=1, warmup_start=0, warmup=1,
             batch_size=16, eval_every=0)


def _setup(plan):
    return plan.resolve(train_val_split(**plan.selection))


def _checkpoint(**options):
    setup = _setup(plan_from_options(SAMPLE, **{**SMALL, **options}))
    trainer = setup.trainer()
    trainer.fit()
    return trainer.state_dict()


def test_a_new_plan_holds_every_selection_key():
    plan = plan_from_options({"data": "sample"})
    assert set(plan.selection) == set(SELECTION_KEYS)


def test_a_new_plan_keeps_the_data_selection_it_is_given():
    plan = plan_from_options({"data": "data.npz", "start": 4, "num": 20, "val_size": 5})
    assert (plan.selection["data"], plan.selection["start"], plan.selection["num"],
            plan.selection["val_size"]) == ("data.npz", 4, 20, 5)


def test_a_selection_without_starts_starts_at_image_0():
    plan = plan_from_options({"data": "sample", "start": None})
    assert (plan.selection["start"], plan.selection["val_start"]) == (0, 0)


def test_options_given_as_none_take_the_presets_values():
    setup = _setup(plan_from_options(SAMPLE, epochs=None, lr=None))
    assert (setup.config.epochs, setup.config.lr) == (100, 5e-4)  # the mnist preset, for 1-channel images


def test_options_given_override_the_preset():
    setup = _setup(plan_from_options(SAMPLE, epochs=3, lr=0.01))
    assert (setup.config.epochs, setup.config.lr) == (3, 0.01)


def test_a_named_preset_replaces_the_one_the_channels_choose():
    setup = _setup(plan_from_options(SAMPLE, preset="cifar"))
    assert setup.config.epochs == 200


def test_an_unknown_config_field_is_a_usage_error_naming_it():
    with pytest.raises(UsageError) as info:
        plan_from_options({"data": "sample"}, learning_rate=0.1)
    assert info.value.param == "learning_rate"


def test_a_patch_too_large_for_any_image_fails_before_any_data_is_read():
    with pytest.raises(UsageError) as info:
        plan_from_options({"data": "no-such-file.npz"}, patch="5000x5000")
    assert info.value.param == "size"


def test_a_sparse_run_does_not_check_the_patch():
    plan = plan_from_options({"data": "sample"}, patch="5000x5000", sparse=3)
    assert plan.config["sparse"] == 3


def test_a_config_value_out_of_range_fails_when_resolved_naming_the_field():
    plan = plan_from_options(SAMPLE, batch_size=0)
    with pytest.raises(UsageError) as info:
        _setup(plan)
    assert info.value.param == "batch_size"


def test_the_architecture_records_the_images_shape_and_classes():
    setup = _setup(plan_from_options(SAMPLE, architecture="CNN2", width=2))
    assert setup.architecture == {"name": "cnn2", "width": 2, "in_channels": 1, "image_size": [SIZE, SIZE],
                                  "num_classes": NUM_CLASSES, "mean": None, "std": None}


def test_the_architecture_keeps_the_normalization_given():
    setup = _setup(plan_from_options(SAMPLE, mean=(0.5,), std=(0.25,)))
    assert (setup.architecture["mean"], setup.architecture["std"]) == ([0.5], [0.25])


def test_the_width_left_out_is_the_architectures_default():
    setup = _setup(plan_from_options(SAMPLE, architecture="mlp"))
    assert (setup.architecture["width"], setup.width) == (None, 255)


def test_the_meta_keeps_the_architecture_and_the_resolved_selection():
    plan = plan_from_options(SAMPLE)
    splits = train_val_split(**plan.selection)
    setup = plan.resolve(splits)
    assert setup.meta == {"architecture": setup.architecture, "data_selection": splits.selection}


def test_the_model_is_initialised_from_the_seed():
    setup = _setup(plan_from_options(SAMPLE, **SMALL, seed=3))
    first, second = setup.model(), setup.model()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_the_model_maps_the_images_to_one_logit_per_class():
    setup = _setup(plan_from_options(SAMPLE, **SMALL))
    assert setup.model()(torch.zeros(2, 1, SIZE, SIZE)).shape == (2, NUM_CLASSES)


def test_a_new_run_does_not_resume():
    plan = plan_from_options(SAMPLE, **SMALL)
    assert not plan.resuming and _setup(plan).trainer().epoch == 0


def test_a_continued_plan_reads_the_data_selection_of_its_checkpoint():
    state = _checkpoint()
    plan = plan_from_checkpoint(state)
    assert plan.resuming and plan.selection == state["meta"]["data_selection"]


def test_a_selection_saved_as_sample_continues_on_the_samples_training_digits():
    state = {"config": {}, "meta": {"data_selection": {"data": "sample", "val_data": None}}}
    assert plan_from_checkpoint(state).selection["data"] == "sample:train"


def test_a_continued_run_keeps_the_checkpoints_config_and_architecture():
    state = _checkpoint(lr=0.003)
    setup = _setup(plan_from_checkpoint(state))
    assert (setup.config.lr, setup.architecture) == (0.003, state["meta"]["architecture"])


def test_a_continued_run_takes_the_epochs_chunk_size_and_device_given():
    state = _checkpoint()
    setup = _setup(plan_from_checkpoint(state, epochs=5, chunk_size=64, device="cpu"))
    assert (setup.config.epochs, setup.config.chunk_size, setup.config.device) == (5, 64, "cpu")


def test_a_continued_run_leaves_the_epochs_and_chunk_size_of_its_checkpoint_when_none_are_given():
    state = _checkpoint()
    setup = _setup(plan_from_checkpoint(state))
    assert (setup.config.epochs, setup.config.chunk_size) == (1, None)


def test_a_continued_runs_trainer_starts_where_the_checkpoint_stopped():
    state = _checkpoint()
    trainer = _setup(plan_from_checkpoint(state, epochs=2)).trainer()
    assert trainer.epoch == 1 and isinstance(trainer.config, TrainConfig)


# --------------------------------------------------------------------------- the warm-up scaled to --epochs

MNIST_WARMUP = Warmup(warmup_start=1, warmup=61, epochs=100)


def test_epochs_alone_scale_the_presets_warmup_to_the_same_fraction_of_the_run():
    setup = _setup(plan_from_options(SAMPLE, epochs=10))
    assert (setup.config.warmup_start, setup.config.warmup) == (1, 6)
    assert setup.warmup_scaled_from == MNIST_WARMUP


def test_a_warmup_given_is_kept_as_given():
    setup = _setup(plan_from_options(SAMPLE, epochs=10, warmup=3))
    assert (setup.config.warmup_start, setup.config.warmup, setup.warmup_scaled_from) == (1, 3, None)


def test_a_warmup_start_given_keeps_the_presets_warmup():
    setup = _setup(plan_from_options(SAMPLE, epochs=10, warmup_start=2))
    assert (setup.config.warmup_start, setup.config.warmup, setup.warmup_scaled_from) == (2, 61, None)


def test_the_presets_own_epochs_keep_its_warmup():
    setup = _setup(plan_from_options(SAMPLE))
    assert (setup.config.warmup_start, setup.config.warmup, setup.warmup_scaled_from) == (1, 61, None)


@pytest.mark.parametrize("epochs", range(1, 100))
def test_a_scaled_warmup_reaches_full_strength_before_the_last_epoch(epochs):
    scaled = scaled_warmup(MNIST_WARMUP, epochs)
    assert scaled.warmup_start + scaled.warmup <= max(0, epochs - 1)


@pytest.mark.parametrize("epochs, expected", [(1, (0, 0)), (2, (0, 1)), (5, (1, 3)), (50, (1, 31))])
def test_a_short_run_scales_the_natural_epochs_then_the_ramp(epochs, expected):
    assert tuple(scaled_warmup(MNIST_WARMUP, epochs))[:2] == expected


def test_a_run_longer_than_the_presets_keeps_its_warmup():
    assert scaled_warmup(MNIST_WARMUP, 150) == Warmup(1, 61, 150)


def test_a_continued_run_keeps_its_checkpoints_scaled_warmup_for_more_epochs():
    trainer = _setup(plan_from_options(SAMPLE, architecture="mlp", width=4, epochs=2, eval_every=0)).trainer()
    setup = _setup(plan_from_checkpoint(trainer.state_dict(), epochs=10))
    assert (setup.config.warmup_start, setup.config.warmup, setup.warmup_scaled_from) == (0, 1, None)
