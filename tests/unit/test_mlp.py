"""The slimmable MLP: every extracted subnet is physically smaller and matches the supernet."""

from __future__ import annotations

import pytest
import torch

from dynaroute.experts.flops import count_flops, count_params, exit_flops
from dynaroute.experts.mlp import MLPConfig, SlimmableMLP
from dynaroute.experts.spec import SubnetSpec


@pytest.fixture(scope="module")
def model() -> SlimmableMLP:
    torch.manual_seed(0)
    return SlimmableMLP(MLPConfig(num_paths=2)).eval()


def test_offers_every_width_depth_and_path(model: SlimmableMLP) -> None:
    specs = model.subnets()
    assert len(specs) == 4 * 3 * 2
    assert SubnetSpec(0.25, 1, 0) in specs and SubnetSpec(1.0, 3, 1) in specs
    assert model.full_spec == SubnetSpec(1.0, 3, 0)


def test_every_extracted_subnet_matches_the_supernet(model: SlimmableMLP) -> None:
    x = torch.rand(16, 64) * 16
    for spec in model.subnets():
        sub = model.extract(spec)
        torch.testing.assert_close(sub(x), model(x, spec), atol=1e-5, rtol=0)
        # each exit of the extracted module is the subnet of that depth
        for depth, logits in enumerate(sub.forward_exits(x), start=1):
            torch.testing.assert_close(logits, model(x, SubnetSpec(spec.width, depth, spec.path)), atol=1e-5, rtol=0)


def test_extraction_slices_weights_physically(model: SlimmableMLP) -> None:
    full = count_params(model.extract(model.full_spec))
    assert full < count_params(model)  # one path of two
    small = model.extract(SubnetSpec(0.25, 1, 0))
    assert small.blocks[0].weight.shape == (64, 64)
    assert count_params(small) < full / 10


def test_flops_are_measured_and_grow_with_width_and_depth(model: SlimmableMLP) -> None:
    x = torch.rand(1, 64)
    flops = {s: count_flops(model.extract(s), x) for s in model.subnets() if s.path == 0}
    # a Linear(in, out) on one row is 2 * in * out FLOPs: block 0 + exit head at w0.25, d1
    assert flops[SubnetSpec(0.25, 1, 0)] == 2 * 64 * 64 + 2 * 64 * 10
    for w in (0.25, 0.5, 0.75):
        for d in (1, 2):
            assert flops[SubnetSpec(w, d, 0)] < flops[SubnetSpec(w, d + 1, 0)]
            assert flops[SubnetSpec(w, d, 0)] < flops[SubnetSpec(w + 0.25, d, 0)]
    cumulative = exit_flops(model.extract(model.full_spec), x)
    assert cumulative == sorted(cumulative) and cumulative[-1] >= flops[model.full_spec]


def test_unknown_subnet_is_refused_with_the_choices(model: SlimmableMLP) -> None:
    with pytest.raises(ValueError, match="w0.3-d1-p0.*expected one of"):
        model.extract(SubnetSpec(0.3, 1, 0))


@pytest.mark.parametrize(
    "kwargs, field",
    [({"hidden": 0}, "hidden"), ({"widths": (0.5,)}, "widths"), ({"num_classes": 1}, "num_classes")],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MLPConfig(**kwargs)


def test_subnet_names_round_trip() -> None:
    spec = SubnetSpec(0.75, 2, 1)
    assert spec.name == "w0.75-d2-p1"
    assert SubnetSpec.parse(spec.name) == spec
    with pytest.raises(ValueError, match="w0.5-d2-p0"):
        SubnetSpec.parse("full")


def test_supernet_training_is_seeded_and_reproducible() -> None:
    from dynaroute.data import load_digits_splits
    from dynaroute.training.supernet import SupernetTrainConfig, train_supernet

    train = load_digits_splits().train
    runs = []
    for _ in range(2):
        torch.manual_seed(7)  # the initial weights; train_supernet seeds the rest
        m = SlimmableMLP(MLPConfig(hidden=32, num_blocks=2))
        losses = train_supernet(m, train, SupernetTrainConfig(epochs=2, seed=7), progress=False)
        runs.append((losses, m.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][0][1] < runs[0][0][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k
