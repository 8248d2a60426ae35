"""A worst lower margin of exactly 0 does not certify: a patch reaching it ties the logits, and
``argmax`` may then return the other class. ``evaluate`` flags a certified image whose
prediction the attack changed, whatever the margins."""

from __future__ import annotations

import torch
from torch import nn

from lirpa_patch import certify, consistency_violations, evaluate_patch
from lirpa_patch.attacks import AttackResult, ImageAttack
from lirpa_patch.engine import CertifyResult, ImageResult
from lirpa_patch.spec import certifies


class _Tie(nn.Module):
    """Two classes on 3x3 images: z0 = 0, z1 = 1 - pixel (0, 0). Label 1's margin is 1 - p >= 0,
    exactly 0 at p = 1, where the logits tie and argmax returns class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(9, 2)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.copy_(torch.tensor([0.0, 1.0]))
            self.fc.weight[1, 0] = -1.0

    def forward(self, x):
        return self.fc(x.flatten(1))


def _images():
    return torch.zeros(2, 1, 3, 3), torch.tensor([1, 1])


def test_the_certification_predicate_is_a_strict_inequality():
    assert not certifies(0.0) and certifies(1e-30) and not certifies(-1e-30)
    assert certifies(torch.tensor([0.0, 0.5, -0.5])).tolist() == [False, True, False]


def test_a_worst_margin_of_exactly_zero_is_not_certified():
    images, labels = _images()
    for method in ("ibp", "crown"):
        for groups in (None, "auto"):
            result = certify(_Tie(), images, labels, size=1, method=method, groups=groups)
            assert [r.worst_margin for r in result.images] == [0.0, 0.0]
            assert [r.certified for r in result.images] == [False, False]


def test_the_patch_that_reaches_a_zero_margin_changes_the_prediction():
    image = torch.zeros(1, 1, 3, 3)
    image[0, 0, 0, 0] = 1.0
    assert int(_Tie()(image).argmax(1)) == 0


def test_evaluate_on_a_tie_reports_no_certified_image_and_no_violation():
    images, labels = _images()
    evaluation = evaluate_patch(_Tie(), images, labels, size=1)
    assert evaluation.certified.num_certified == 0
    assert evaluation.attacked.num_successes == 2
    assert evaluation.violations == []


def test_a_certified_image_whose_prediction_the_attack_changed_is_a_violation_whatever_the_margins():
    cert = CertifyResult(images=[ImageResult(index=0, label=1, prediction=1, correct=True, certified=True,
                                             worst_margin=0.0, worst_location=None, worst_class=0)],
                         shape=None, num_locations=9, method="ibp", seconds=0.0, chunk_size=1)
    att = AttackResult(images=[ImageAttack(index=0, label=1, prediction=1, correct=True, success=True, margin=0.0,
                                           adversarial_class=0, location=None)],
                       adversarial=torch.zeros(1, 1, 3, 3), threat="patch")
    assert [v.index for v in consistency_violations(cert, att)] == [0]
