"""lirpa_patch.analysis: the statistics of a report, on small tensors with values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lirpa_patch.analysis import class_accuracy, location_map, margin_histogram, most_broken, wilson_interval
from lirpa_patch.errors import UsageError


def test_wilson_interval_of_8_in_10_matches_the_textbook_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_interval_stays_inside_zero_and_one_at_the_extremes():
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0 < high < 0.2
    low, high = wilson_interval(20, 20)
    assert 0.8 < low < 1 and high == 1.0


def test_wilson_interval_of_no_images_is_everything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_refuses_more_successes_than_trials():
    with pytest.raises(UsageError, match="successes"):
        wilson_interval(3, 2)


def test_class_accuracy_counts_images_correct_and_certified_per_label():
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    correct = torch.tensor([True, True, False, True, True, False])
    certified = torch.tensor([True, False, False, True, False, False])
    counts = class_accuracy(labels, correct, certified, num_classes=4)
    assert counts.images.tolist() == [1, 2, 3, 0]
    assert counts.correct.tolist() == [1, 1, 2, 0]
    assert counts.certified.tolist() == [1, 0, 1, 0]
    assert counts.num_classes == 4


def test_class_accuracy_refuses_tensors_of_different_lengths():
    with pytest.raises(UsageError, match="labels"):
        class_accuracy(torch.tensor([0, 1]), torch.tensor([True]), torch.tensor([True, False]))


def test_location_map_counts_the_fraction_decertified_and_the_worst_location_among_bounded_images():
    margins = torch.tensor([
        [0.5, -0.2, 0.1],   # decertified at 1; worst at 1
        [-0.3, -0.1, 0.2],  # decertified at 0 and 1; worst at 0
        [0.4, 0.3, 0.2],    # certified; worst at 2
        [float("nan")] * 3,  # misclassified: not counted
    ])
    result = location_map(margins)
    assert result.num_images == 3
    assert result.decertified.tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert result.worst.tolist() == [1, 1, 1]


def test_location_map_counts_only_the_images_asked_for():
    margins = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])
    result = location_map(margins, correct=torch.tensor([False, True]))
    assert result.num_images == 1 and result.decertified.tolist() == [0.0, 1.0] and result.worst.tolist() == [0, 1]


def test_location_map_of_no_bounded_image_is_zero():
    result = location_map(torch.full((2, 3), float("nan")))
    assert result.num_images == 0 and result.decertified.tolist() == [0.0] * 3 and result.worst.tolist() == [0] * 3


def test_location_map_refuses_a_vector():
    with pytest.raises(UsageError, match="location_margins"):
        location_map(torch.zeros(3))


def test_margin_histogram_puts_zero_on_an_edge_and_splits_certified_from_uncertified():
    hist = margin_histogram([-1.0, -0.5, None, 0.25, 1.0], [False, False, False, True, True], bins=4)
    assert 0.0 in hist.edges.tolist()
    assert int(hist.certified.sum()) == 2 and int(hist.uncertified.sum()) == 2  # None left out
    zero = hist.edges.tolist().index(0.0)
    assert int(hist.uncertified[zero:].sum()) == 0 and int(hist.certified[:zero].sum()) == 0


def test_margin_histogram_of_one_value_has_a_bin_around_it():
    hist = margin_histogram(torch.tensor([0.3, 0.3]), torch.tensor([True, True]), bins=3)
    assert hist.certified.tolist() == [0, 2, 0] and hist.edges[0] < 0.3 < hist.edges[-1]


def test_most_broken_lists_the_most_negative_uncertified_margins_first():
    margins = [-0.001, 0.5, -2.0, None, -0.3]
    certified = [False, True, False, False, False]
    assert most_broken(margins, certified, 2) == [2, 4]
    assert most_broken(margins, certified, 10) == [2, 4, 0]


def test_wilson_interval_contains_the_observed_proportion():
    for k in range(0, 11):
        low, high = wilson_interval(k, 10)
        assert low <= k / 10 <= high and not math.isnan(low)
