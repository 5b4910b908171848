import numpy as np
import pytest
import torch

from sharetune.analysis import cka_matrix, linear_cka, plot_cka
from sharetune.models import cka_plan, create_model


def batches(x, size=32):
    return [x[i : i + size] for i in range(0, len(x), size)]


def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(128, 20)
    assert linear_cka(batches(x), batches(x)) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    torch.manual_seed(0)
    x, y = torch.randn(128, 20), torch.randn(128, 20)
    y = y + x @ torch.randn(20, 20) * 0.5
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    base = linear_cka(batches(x), batches(y))
    assert 0.05 < base < 0.99
    assert linear_cka(batches(x), batches((y.double() @ q).float() * 7.5)) == pytest.approx(base, abs=1e-6)


def test_cka_separates_unrelated_representations():
    torch.manual_seed(0)
    assert abs(linear_cka(batches(torch.randn(256, 10)), batches(torch.randn(256, 10)))) < 0.1


def test_cka_matrix_of_a_model_and_its_heatmap(tmp_path):
    torch.manual_seed(0)
    model = create_model("convmixer", dim=8, depth=6, patch_size=2, kernel_size=3, num_classes=3, in_chans=1)
    data = batches(torch.randn(64, 1, 8, 8), 16)
    matrix = cka_matrix(model, data)
    assert matrix.shape == (6, 6)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-9)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-9)
    between = cka_matrix(model, data, model_b=create_model("convmixer", dim=8, depth=6, patch_size=2, kernel_size=3, num_classes=3, in_chans=1))
    assert between.shape == (6, 6) and model.training
    model.eval()
    cka_matrix(model, data)
    assert not model.training  # each model is left in the mode it was in
    assert plot_cka(matrix, tmp_path / "cka.png").stat().st_size > 1000


def test_cka_plan_groups_similar_neighbours_within_the_budget():
    similarity = np.full((6, 6), 0.1)
    for group in ([0, 1, 2], [3], [4, 5]):
        similarity[np.ix_(group, group)] = 0.95
    np.fill_diagonal(similarity, 1.0)
    plan = cka_plan(similarity, share_rate=2)
    assert plan.bank_ids == (0, 0, 0, 1, 2, 2)
    assert plan.num_entries == 3


def test_cka_mapping_builds_a_plan_from_a_pretrained_model():
    torch.manual_seed(0)
    arch = dict(dim=8, depth=6, patch_size=2, kernel_size=3, num_classes=3, in_chans=1)
    pretrained = create_model("convmixer", **arch).state_dict()
    data = torch.randn(64, 1, 8, 8)
    model = create_model("convmixer", **arch, pretrained=pretrained, cka_data=data, sharing={"mapping": "cka", "share_rate": 2})
    plan = model.sharing_plan
    assert plan.num_entries == 3 and list(plan.bank_ids) == sorted(plan.bank_ids)  # contiguous groups
    assert model.training  # as every model is built: comparing its layers ran in eval mode, and ended there once
    with pytest.raises(ValueError, match="mapping: 'cka' needs pretrained"):
        create_model("convmixer", **arch, sharing={"mapping": "cka", "share_rate": 2})
    for count in (65, 4):  # a last minibatch of 1 once failed HSIC's four; 4 is the least it takes
        create_model("convmixer", **arch, pretrained=pretrained, cka_data=torch.randn(count, 1, 8, 8),
                     sharing={"mapping": "cka", "share_rate": 2})
    with pytest.raises(ValueError, match="cka_data: the cka mapping compares layers on 4 inputs or more, got 3"):
        create_model("convmixer", **arch, pretrained=pretrained, cka_data=data[:3], sharing={"mapping": "cka", "share_rate": 2})
    with pytest.raises(ValueError, match="sharing: the cka mapping needs share_rate"):
        create_model("convmixer", **arch, pretrained=pretrained, cka_data=data, sharing={"mapping": "cka"})
