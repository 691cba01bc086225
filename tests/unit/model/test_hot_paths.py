"""Each hot path against the path it replaces: GQA without repeated K/V, flex block masks, chunked loss, prefill."""

from __future__ import annotations

import warnings

import pytest
import torch

import model.attention as attention
from model import ModelConfig, Transformer
from model.loss import IGNORE_INDEX, chunked_linear_cross_entropy, masked_cross_entropy

SMALL = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=40)


def small_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SMALL, **overrides})).double()


def tokens_of(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def loss_and_grads(model: Transformer, **inputs) -> tuple:
    model.zero_grad(set_to_none=True)
    _, loss = model(**inputs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_loss_and_grads(a: tuple, b: tuple, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_gqa_without_repeated_kv_equals_the_repeat_path(n_kv_heads, monkeypatch):
    assert attention.SDPA_SUPPORTS_GQA  # torch 2.13: the enable_gqa path is the one in use
    model = small_model(n_kv_heads=n_kv_heads, loss_chunk_tokens=0).train()
    tokens = tokens_of(2, 24)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    for extra in ({}, {"doc_ids": doc_ids}):  # causal (is_causal) and dense-masked attention
        inputs = dict(tokens=tokens, targets=tokens_of(2, 24, seed=2), **extra)
        gqa = loss_and_grads(model, **inputs)
        monkeypatch.setattr(attention, "SDPA_SUPPORTS_GQA", False)  # today's repeat_interleave path
        repeated = loss_and_grads(model, **inputs)
        monkeypatch.setattr(attention, "SDPA_SUPPORTS_GQA", True)
        assert_same_loss_and_grads(gqa, repeated)
    # And with a KV cache (decode: one query against every cached key; and several new queries).
    with torch.no_grad():
        full = model.eval()(tokens)[0]
        monkeypatch.setattr(attention, "SDPA_SUPPORTS_GQA", False)
        torch.testing.assert_close(model(tokens)[0], full, rtol=1e-12, atol=1e-12)


def documents(batch: int, length: int) -> tuple:
    """Random document boundaries: doc_ids (B, T) and position_ids restarting at every document."""
    gen = torch.Generator().manual_seed(3)
    starts = torch.rand(batch, length, generator=gen) < 0.15
    starts[:, 0] = True
    doc_ids = starts.long().cumsum(1)
    idx = torch.arange(length).expand(batch, length)
    position_ids = idx - torch.where(starts, idx, 0).cummax(1).values
    return doc_ids, position_ids


def test_flex_block_mask_equals_the_dense_mask_path():
    """On CPU flex_attention has no backward (torch 2.13), so forward here; bench/gpu.py checks gradients on CUDA."""
    assert attention.flex_attention is not None  # torch 2.13 has flex attention
    dense, flex = small_model(attention="sdpa").eval(), small_model(attention="flex").eval()
    flex.load_state_dict(dense.state_dict())
    doc_ids, position_ids = documents(3, 40)
    inputs = dict(tokens=tokens_of(3, 40), doc_ids=doc_ids, position_ids=position_ids)
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert isinstance(attention.attention_mask(40, 0, doc_ids, cpu, "flex"), attention.BlockMask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unfused
            flex_logits = flex(**inputs)[0]
        torch.testing.assert_close(flex_logits, dense(**inputs)[0], rtol=1e-10, atol=1e-12)
        # auto: dense on CPU; without documents every choice is plain causal SDPA
        assert isinstance(attention.attention_mask(40, 0, doc_ids, cpu, "auto"), torch.Tensor)
        assert attention.attention_mask(40, 0, None, cpu, "flex") is None
    # With gradients on CPU flex cannot run: the dense mask serves, with the same result.
    assert isinstance(attention.attention_mask(40, 0, doc_ids, cpu, "flex"), torch.Tensor)


@pytest.mark.parametrize("chunk", [1, 7, 48, 1000])  # one token, not dividing 48, exactly all, more than all
def test_chunked_cross_entropy_equals_the_full_logits_loss(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 24, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(97, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 97, (2, 24), generator=gen)
    targets[0, :9] = IGNORE_INDEX  # IFT prompt tokens
    targets[1, 20:] = IGNORE_INDEX  # padding
    for wanted in (targets, torch.full_like(targets, IGNORE_INDEX)):  # some targets count; none do
        plain = masked_cross_entropy(hidden @ weight.T, wanted)
        plain_grads = torch.autograd.grad(3.0 * plain, (hidden, weight))  # a scale, as DeepSpeed applies
        chunked = chunked_linear_cross_entropy(hidden, weight, wanted, chunk)
        chunked_grads = torch.autograd.grad(3.0 * chunked, (hidden, weight))
        torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)
        for ours, theirs in zip(chunked_grads, plain_grads):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        with torch.no_grad():  # evaluation: no gradients computed, same loss
            torch.testing.assert_close(chunked_linear_cross_entropy(hidden, weight, wanted, chunk), plain)
    assert chunked.item() == 0.0 and all(g.abs().sum() == 0 for g in chunked_grads)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_chunked_loss_model_gradients_equal_the_plain_path(tie_embeddings):
    plain = small_model(loss_chunk_tokens=0, tie_embeddings=tie_embeddings).train()
    chunked = small_model(loss_chunk_tokens=5, tie_embeddings=tie_embeddings).train()
    chunked.load_state_dict(plain.state_dict())
    targets = tokens_of(2, 16, seed=2)
    targets[0, :6] = IGNORE_INDEX
    inputs = dict(tokens=tokens_of(2, 16), targets=targets)
    assert chunked(**inputs)[0] is None  # the logits are never built
    assert_same_loss_and_grads(loss_and_grads(chunked, **inputs), loss_and_grads(plain, **inputs))


def test_chunked_loss_in_bf16_is_close_to_the_plain_path():
    plain = small_model(loss_chunk_tokens=0).to(torch.bfloat16).train()
    chunked = small_model(loss_chunk_tokens=8).to(torch.bfloat16).train()
    chunked.load_state_dict(plain.state_dict())
    inputs = dict(tokens=tokens_of(2, 32), targets=tokens_of(2, 32, seed=2))
    ours, theirs = loss_and_grads(chunked, **inputs), loss_and_grads(plain, **inputs)
    assert ours[0].dtype == torch.float32 and ours[1]["embed_tokens.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-3, atol=1e-3)
    for name in theirs[1]:
        scale = theirs[1][name].float().abs().max()
        assert (ours[1][name].float() - theirs[1][name].float()).abs().max() <= 0.02 * scale, name


def test_prefill_last_logits_equal_the_full_path():
    model = small_model().eval()
    tokens = tokens_of(3, 17)
    with torch.no_grad():
        full = model(tokens)[0]  # (3, 17, V)
        last = model(tokens, last_logits_only=True)[0]
    assert last.shape == (3, 1, SMALL["vocab_size"])
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-12, atol=1e-12)
    calls = []
    model.lm_head.register_forward_hook(lambda _m, args, out: calls.append(tuple(out.shape)))
    model.generate(tokens, 3, temperature=0)
    assert calls == [(3, 1, SMALL["vocab_size"])] * 3  # prefill and each decode step: one position each
