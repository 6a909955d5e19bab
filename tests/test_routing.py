"""TREAD token routing (training.model.TokenRouting): the route is undone exactly, nothing is added to the model,
inference ignores it, and at rate 0 training is the plain model's bit for bit."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.model import PRESETS, PixArt, TokenRouting, route_tokens, unroute_tokens


@given(batch=st.integers(1, 4), tokens=st.integers(1, 80), rate=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_tokens_return_to_their_positions(batch, tokens, rate, seed):
    torch.manual_seed(seed)
    x = torch.randn(batch, tokens, 6)
    routed, positions = route_tokens(x, rate)
    stay = tokens - int(tokens * rate)  # hand count: the share that skips, rounded down
    assert routed.shape == (batch, stay, 6)
    # Undoing the route with untouched tokens gives the input back exactly.
    assert torch.equal(unroute_tokens(x, routed, positions), x)
    # Tokens changed inside the route land at the positions they were taken from; the others keep their old values.
    changed = unroute_tokens(x, routed * 10 + 1, positions)
    if positions is None:
        assert stay == tokens and torch.equal(changed, x * 10 + 1)
        return
    assert all(len(set(row.tolist())) == stay for row in positions)  # distinct positions per sample
    took = torch.zeros(batch, tokens, dtype=torch.bool)
    took[torch.arange(batch)[:, None], positions] = True
    assert torch.equal(changed[took], (x * 10 + 1)[took])
    assert torch.equal(changed[~took], x[~took])


def tiny_text_model(**overrides) -> PixArt:
    torch.manual_seed(0)
    model = PixArt(dataclasses.replace(PRESETS["tiny"], depth=4, caption_dropout=0.0, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # a trained-like model: nothing is zero, so every block changes its tokens
    return model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 12, 32, generator=g),
            torch.ones(2, 12, dtype=torch.bool))


def test_rate_zero_trains_exactly_like_the_plain_model():
    plain, routed = tiny_text_model().train(), tiny_text_model().train()
    routed.routing = TokenRouting(rate=0.0, start=1, end=3)
    x, t, caption, mask = inputs()
    a, b = plain(x, t, caption, mask), routed(x, t, caption, mask)
    assert torch.equal(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), routed.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_routing_adds_nothing_and_inference_runs_every_token():
    plain, routed = tiny_text_model(), tiny_text_model()
    routed.routing = TokenRouting(rate=0.5, start=1, end=3)
    assert plain.state_dict().keys() == routed.state_dict().keys()
    x, t, caption, mask = inputs()
    with torch.no_grad():
        assert torch.equal(plain.eval()(x, t, caption, mask), routed.eval()(x, t, caption, mask))
        # In training the route changes the result (the routed blocks see half the tokens) ...
        train_out = routed.train()(x, t, caption, mask)
    assert not torch.allclose(train_out, plain(x, t, caption, mask))


def test_the_routed_forward_is_the_blocks_run_on_the_kept_tokens():
    """A reference forward written out by hand, drawing the same random positions, gives the same output."""
    model = tiny_text_model().train()
    model.routing = TokenRouting(rate=0.25, start=1, end=3)
    x, t, caption, mask = inputs()
    torch.manual_seed(5)
    out = model(x, t, caption, mask)

    torch.manual_seed(5)
    h = model.x_embedder(x) + model.pos_embed((4, 4), x.device)
    temb = model.t_embedder(t)
    y = model.y_embedder(caption, None)
    t0 = model.t_block(temb)
    m = mask[:, None, None, :]
    h = model.blocks[0](h, y, t0, m)
    positions = torch.rand(2, 16).argsort(dim=1)[:, :12]  # 16 tokens, 25 % (4) skip blocks 1 and 2
    kept = torch.stack([h[i, positions[i]] for i in range(2)])
    kept = model.blocks[2](model.blocks[1](kept, y, t0, m), y, t0, m)
    merged = h.clone()
    for i in range(2):
        merged[i, positions[i]] = kept[i]
    expected = model.unpatchify(model.final_layer(model.blocks[3](merged, y, t0, m), temb), 4, 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_routing_past_the_last_block_is_refused():
    with pytest.raises(ValueError, match="rate"):
        TokenRouting(rate=1.0)
    with pytest.raises(ValueError, match="start"):
        TokenRouting(rate=0.5, start=2, end=2)
    model = tiny_text_model().train()
    model.routing = TokenRouting(rate=0.5, start=1, end=9)
    with pytest.raises(ValueError, match="routing.end"):
        model(*inputs())
