"""The transformer against direct reference computations, its invariants, and a real overfit run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from launch.config import load_config
from model import ModelConfig, Transformer
from model.loss import IGNORE_INDEX
from model.transformer import KVCache, apply_rotary, rotary_cos_sin
from tests.helpers import SHAKESPEARE, TINY

SMALL = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)


def small_model(seed: int = 0, **overrides) -> Transformer:
    """A float64 model small enough for exact comparisons (float64 keeps greedy ties and tolerances sane)."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **overrides})).double().eval()


def random_tokens(batch: int, length: int, vocab: int = SMALL["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_loss():
    model = small_model()
    tokens = random_tokens(3, 11)
    logits, loss = model(tokens)
    assert logits.shape == (3, 11, SMALL["vocab_size"]) and logits.dtype == torch.float64
    assert loss is None
    _, loss = model(tokens, targets=random_tokens(3, 11, seed=2))
    assert loss.shape == () and math.isfinite(loss.item())
    # A fresh model predicts roughly uniformly: loss near ln(vocab).
    assert abs(loss.item() - math.log(SMALL["vocab_size"])) < 0.5


def test_parameter_names_are_hugging_face_llama_names():
    names = set(Transformer(ModelConfig(**SMALL, tie_embeddings=False)).state_dict())
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for i in range(SMALL["n_layers"]):
        expected |= {f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"}
        expected |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert names == expected


def test_changing_a_later_token_never_changes_earlier_logits():
    model = small_model()
    tokens = random_tokens(2, 16)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % SMALL["vocab_size"]
    before, after = model(tokens)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-12)
    assert (before[:, 10:] - after[:, 10:]).abs().amax() > 1e-3


def reference_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Causal attention written out by hand: complex-number RoPE, explicit head mapping, explicit softmax."""
    B, T, _ = x.shape
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, H, hd)
    k = (x @ attn.k_proj.weight.T).view(B, T, KV, hd)
    v = (x @ attn.v_proj.weight.T).view(B, T, KV, hd)

    def rope(t: torch.Tensor) -> torch.Tensor:  # channel i pairs with i + hd/2 as one complex number
        half = hd // 2
        freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs  # (T, half)
        z = (
            torch.complex(t[..., :half], t[..., half:])
            * torch.polar(torch.ones_like(angle), angle)[None, :, None]
        )
        return torch.cat((z.real, z.imag), dim=-1)

    q, k = rope(q), rope(k)
    heads = []
    for h in range(H):
        kv = h // (H // KV)  # query head h reads key/value head h // group size
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(hd)  # (B, T, T)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, :, kv])  # (B, T, hd)
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_grouped_query_attention_matches_a_direct_reference(n_kv_heads):
    model = small_model(n_kv_heads=n_kv_heads)
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (n_kv_heads * 16, 64)
    x = torch.randn(2, 12, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_cos_sin(torch.arange(12).expand(2, 12), attn.head_dim, 10000.0)
    ours = attn(x, cos.double(), sin.double(), None)
    # Rotation angles are float32 (as in Hugging Face Llama), hence the float32-level tolerance.
    torch.testing.assert_close(ours, reference_attention(attn, x), rtol=1e-5, atol=1e-7)


def test_rope_dot_product_depends_only_on_relative_position():
    head_dim = 16
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, dtype=torch.float64, generator=gen)

    def rotated_dot(m: int, n: int) -> float:
        positions = torch.tensor([[m, n]])
        cos, sin = rotary_cos_sin(positions, head_dim, 10000.0)  # (1, 2, head_dim)
        pair = apply_rotary(torch.stack((q, k))[None, None], cos.double(), sin.double())[0, 0]
        return float(pair[0] @ pair[1])

    for m, n in [(0, 0), (5, 2), (3, 9), (40, 17)]:
        for shift in (1, 7, 300):
            # float32 angles (as in Hugging Face), hence the tolerance
            assert rotated_dot(m + shift, n + shift) == pytest.approx(rotated_dot(m, n), rel=1e-5, abs=1e-6)
    assert abs(rotated_dot(5, 2) - rotated_dot(6, 2)) > 1e-3  # the rotation is not the identity


def test_tied_and_untied_embeddings():
    tied = Transformer(ModelConfig(**SMALL, tie_embeddings=True))
    untied = Transformer(ModelConfig(**SMALL, tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == SMALL["vocab_size"] * SMALL["d_model"]
    # The shared matrix gets gradient from both uses.
    tokens = random_tokens(2, 8)
    _, loss = tied(tokens, targets=tokens)
    loss.backward()
    assert tied.embed_tokens.weight.grad is not None and tied.embed_tokens.weight.grad.abs().sum() > 0


def test_initialization_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layers=4,
        d_model=256,
        n_heads=4,
        n_kv_heads=4,
        ffn_hidden=512,
        vocab_size=1024,
        init_std=0.02,
        tie_embeddings=False,
    )
    model = Transformer(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    checked = 0
    for name, param in model.named_parameters():
        values = param.detach().flatten().double()
        if name.endswith("layernorm.weight") or name == "norm.weight":
            assert torch.equal(values, torch.ones_like(values)), name
            continue
        expected = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else cfg.init_std
        n = values.numel()  # >= 65536: relative standard error of the sample std is <= 0.3%
        assert values.std().item() == pytest.approx(expected, rel=0.03), name
        assert abs(values.mean().item()) < 5 * expected / math.sqrt(n), name
        # Normal, not just the right std: P(|x| < sigma) = 0.6827 (a uniform init would give 0.577).
        within = (values.abs() < expected).double().mean().item()
        assert within == pytest.approx(0.6827, abs=0.015), name
        checked += 1
    assert checked == 2 + 7 * cfg.n_layers  # embedding, lm_head and 7 matrices per layer


def test_doc_ids_isolate_documents_and_position_ids_restart():
    model = small_model()
    a_len, b_len = 7, 9
    tokens = random_tokens(2, a_len + b_len)
    doc_ids = torch.tensor([[0] * a_len + [1] * b_len, [5] * (a_len + b_len)])  # row 1 is one document
    positions = torch.stack(
        (torch.cat((torch.arange(a_len), torch.arange(b_len))), torch.arange(a_len + b_len))
    )
    logits = model(tokens, position_ids=positions, doc_ids=doc_ids)[0]

    perturbed = tokens.clone()
    perturbed[0, :a_len] = (perturbed[0, :a_len] + 3) % SMALL["vocab_size"]
    logits_perturbed = model(perturbed, position_ids=positions, doc_ids=doc_ids)[0]
    torch.testing.assert_close(logits_perturbed[0, a_len:], logits[0, a_len:], rtol=0, atol=1e-10)
    assert (logits_perturbed[0, :a_len] - logits[0, :a_len]).abs().amax() > 1e-3

    # Document B in the packed row behaves exactly like B alone at positions 0..b_len-1.
    alone = model(tokens[:1, a_len:])[0]
    torch.testing.assert_close(logits[0, a_len:], alone[0], rtol=0, atol=1e-10)
    # A row that is a single document is plain causal attention.
    torch.testing.assert_close(logits[1], model(tokens[1:])[0][0], rtol=0, atol=1e-10)


def test_position_ids_are_used_relatively():
    model = small_model()
    tokens = random_tokens(2, 10)
    base = model(tokens)[0]
    shifted = model(tokens, position_ids=torch.arange(10).expand(2, 10) + 13)[0]
    torch.testing.assert_close(
        shifted, base, rtol=0, atol=1e-6
    )  # RoPE: only differences matter (float32 angles)
    stretched = model(tokens, position_ids=torch.arange(10).expand(2, 10) * 2)[0]
    assert (stretched[:, 1:] - base[:, 1:]).abs().amax() > 1e-3


@pytest.mark.parametrize(
    "loss_chunk_tokens", [0, 5]
)  # full logits; chunked loss (5 does not divide 24 tokens)
def test_targets_minus_100_are_ignored(loss_chunk_tokens):
    model = small_model(loss_chunk_tokens=loss_chunk_tokens)
    tokens = random_tokens(2, 12)
    targets = random_tokens(2, 12, seed=2)
    targets[0, :5] = IGNORE_INDEX
    targets[1, 8:] = IGNORE_INDEX
    logits, loss = model(tokens)[0], model(tokens, targets=targets)[1]
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    # Changing what an ignored target says changes nothing.
    other = targets.clone()
    other[~keep] = IGNORE_INDEX
    assert model(tokens, targets=other)[1].item() == pytest.approx(loss.item(), rel=1e-12)

    _, nothing = model(tokens, targets=torch.full_like(targets, IGNORE_INDEX))
    assert nothing.item() == 0.0
    nothing.backward()  # still differentiable, gradients are zero rather than NaN
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() == 0 for p in model.parameters())


def test_activation_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool) -> tuple[dict, int]:
        model = small_model().train()
        model.set_activation_checkpointing(checkpointing)
        calls = []
        model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        tokens = random_tokens(2, 16)
        _, loss = model(tokens, targets=tokens)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = gradients(False)
    recomputed, recomputed_calls = gradients(True)
    assert plain_calls == 1 and recomputed_calls == 2  # the block really ran again in backward
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-10, atol=1e-13, msg=name)


def test_dropout_acts_only_in_training_and_recomputes_the_same_masks():
    tokens = random_tokens(2, 16)
    plain, dropped = small_model(), small_model(dropout=0.3)
    torch.testing.assert_close(dropped(tokens)[0], plain(tokens)[0], rtol=0, atol=0)  # eval: no dropout
    torch.manual_seed(5)
    first = dropped.train()(tokens)[0]
    assert not torch.allclose(first, plain(tokens)[0])  # training: masks drawn
    assert not torch.allclose(first, dropped(tokens)[0])  # a new draw each forward

    def gradients(checkpointing: bool) -> dict:
        model = small_model(dropout=0.3).train()
        model.set_activation_checkpointing(checkpointing)
        torch.manual_seed(7)
        _, loss = model(tokens, targets=tokens)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    stored, recomputed = gradients(False), gradients(True)
    for name in stored:  # the recompute in backward draws the masks the forward drew
        torch.testing.assert_close(recomputed[name], stored[name], rtol=1e-10, atol=1e-13, msg=name)
    with pytest.raises(ValueError, match=r"model.dropout=1.0 must be at least 0 and below 1"):
        ModelConfig(**{**SMALL, "dropout": 1.0}).validate()


def test_kv_cache_with_several_new_tokens_matches_full_forward():
    model = small_model()
    tokens = random_tokens(2, 12)
    cache = KVCache(model.cfg, batch_size=2, max_len=12, dtype=torch.float64, device=torch.device("cpu"))
    first = model(tokens[:, :5], kv_cache=cache)[0]
    second = model(tokens[:, 5:9], kv_cache=cache)[0]  # 4 queries against 9 keys: offset causal mask
    third = model(tokens[:, 9:10], kv_cache=cache)[0]
    full = model(tokens[:, :10])[0]
    torch.testing.assert_close(torch.cat((first, second, third), dim=1), full, rtol=0, atol=1e-10)
    assert cache.length == 10


@pytest.mark.parametrize(
    "prompt_len, new_tokens", [(5, 20), (5, 45)]
)  # the second slides past max_seq_len 32
def test_greedy_generation_is_the_same_with_and_without_the_cache(prompt_len, new_tokens):
    model = small_model()
    prompt = random_tokens(2, prompt_len)
    cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    uncached = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + new_tokens)
    assert torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, uncached)
    # Greedy is the argmax of a plain forward over the (cropped) context.
    for t in (prompt_len, prompt_len + new_tokens - 1):
        context = cached[:, max(0, t - SMALL["max_seq_len"]) : t]
        assert torch.equal(cached[:, t], model(context)[0][:, -1].argmax(-1))


def test_sampling_top_k_and_eos():
    model = small_model()
    prompt = random_tokens(2, 4)
    greedy = model.generate(prompt, 12, temperature=0)
    assert torch.equal(model.generate(prompt, 12, temperature=1.0, top_k=1), greedy)

    def sample(use_cache: bool, seed: int) -> torch.Tensor:
        return model.generate(
            prompt,
            12,
            temperature=1.5,
            top_k=20,
            use_cache=use_cache,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(sample(True, 3), sample(True, 3))
    assert torch.equal(sample(True, 3), sample(False, 3))
    assert not torch.equal(sample(True, 3), sample(True, 4))

    eos = int(greedy[0, 4 + 3])  # the 4th token row 0 generates
    stopped = model.generate(prompt, 12, temperature=0, eos_id=eos)
    first_eos = int((stopped[0, 4:] == eos).nonzero()[0])
    assert (stopped[0, 4 + first_eos :] == eos).all()
    assert torch.equal(stopped[:, : 4 + first_eos + 1], greedy[:, : 4 + first_eos + 1])
    both_eos = model.generate(torch.stack((prompt[0], prompt[0])), 12, temperature=0, eos_id=eos)
    assert both_eos.shape[1] == 4 + first_eos + 1  # every row finished: decoding stopped early


def test_tiny_model_overfits_one_batch_of_real_text():
    """configs/tiny.yaml shapes; raw bytes of tinyshakespeare as ids (no tokenizer involved)."""
    torch.manual_seed(0)
    cfg = load_config(TINY).model
    model = Transformer(cfg).train()
    with open(SHAKESPEARE, "rb") as f:
        data = torch.tensor(list(f.read(4 * 64 + 1)), dtype=torch.long)
    assert int(data.max()) < cfg.vocab_size
    batch = torch.stack([data[i * 64 : (i + 1) * 64 + 1] for i in range(4)])  # (4, 65)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(400):
        _, loss = model(inputs, targets=targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < 0.05:
            break
    assert losses[0] > 5.0, losses[0]
    assert losses[-1] < 0.1, f"loss after {len(losses)} steps: {losses[-1]:.3f} (started at {losses[0]:.3f})"
    # Memorized: the argmax predicts (almost) every next byte of the batch.
    accuracy = (model(inputs)[0].argmax(-1) == targets).double().mean().item()
    assert accuracy > 0.97, accuracy
