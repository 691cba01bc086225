"""train.loop: the non-finite watch sees a NaN gradient without a host sync."""

from __future__ import annotations

import torch

from model import ModelConfig, Transformer
from train.loop import NonfiniteWatch

SMALL = ModelConfig(
    n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=256, max_seq_len=16
)


def test_nonfinite_watch_sees_a_nan_gradient_with_a_finite_loss():
    torch.manual_seed(0)
    model = Transformer(SMALL)
    watch = NonfiniteWatch(model, enabled=True)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 8))
    _, loss = model(tokens, targets=tokens)
    loss.backward()
    assert watch.nonfinite(loss.detach()).item() == 0.0
    assert watch.nonfinite(torch.tensor(float("inf"))).item() == 1.0
    # A NaN only in one parameter's gradient (a hook registered before the watch's): the loss stays finite.
    broken = Transformer(SMALL)
    broken.norm.weight.register_hook(lambda g: g * float("nan"))
    watch = NonfiniteWatch(broken, enabled=True)
    _, loss = broken(tokens, targets=tokens)
    loss.backward()
    assert torch.isfinite(loss) and watch.nonfinite(loss.detach()).item() == 1.0
    assert watch.nonfinite(loss.detach()).item() == 0.0  # each call starts afresh
    assert NonfiniteWatch(model, enabled=False).handles == []


def test_accumulated_watch_sees_a_nan_from_an_earlier_micro_batch():
    """One rank at ZeRO 0 in fp32: no hooks; the fused check over the accumulated gradients still sees a NaN that
    only the first of two micro-batches produced."""
    torch.manual_seed(0)
    model = Transformer(SMALL)
    watch = NonfiniteWatch(model, enabled=True, accumulated=True)
    assert watch.handles == []
    tokens = torch.randint(0, SMALL.vocab_size, (2, 8))
    poison = model.norm.weight.register_hook(lambda g: g * float("nan"))
    _, loss = model(tokens, targets=tokens)
    loss.backward()
    poison.remove()
    _, loss = model(tokens, targets=tokens)
    loss.backward()
    assert torch.isfinite(loss) and watch.nonfinite(loss.detach()).item() == 1.0
    model.zero_grad(set_to_none=True)
    _, loss = model(tokens, targets=tokens)
    loss.backward()
    assert watch.nonfinite(loss.detach()).item() == 0.0
    # The guard's gradient norm is summed per micro-batch, so measuring it keeps the hooks.
    assert NonfiniteWatch(model, enabled=True, measure_norm=True, accumulated=True).handles
