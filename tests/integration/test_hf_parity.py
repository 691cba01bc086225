"""Our weights, renamed with a "model." prefix, make Hugging Face's LlamaForCausalLM compute the same logits.

This is what lets the export be a pure rename of keys (same RoPE convention, same norms, same head mapping).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model import ModelConfig, Transformer


def hugging_face_twin(model: Transformer) -> LlamaForCausalLM:
    cfg = model.cfg
    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf_model = LlamaForCausalLM(hf_config).eval()
    renamed = {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()}
    hf_model.load_state_dict(renamed, strict=True)
    return hf_model


@pytest.mark.parametrize("tie_embeddings, n_kv_heads", [(True, 2), (False, 4)])
def test_logits_match_llama_for_causal_lm(tie_embeddings, n_kv_heads):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            n_layers=2,
            d_model=64,
            n_heads=4,
            n_kv_heads=n_kv_heads,
            vocab_size=128,
            max_seq_len=64,
            rope_theta=500000.0,
            tie_embeddings=tie_embeddings,
        )
    ).eval()
    # Untrained weights are nearly uniform; perturb the norms so they matter in the comparison.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    hf_model = hugging_face_twin(model)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)[0]
        theirs = hf_model(tokens).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        shifted = torch.arange(40).expand(2, 40) + 7
        torch.testing.assert_close(
            model(tokens, position_ids=shifted)[0],
            hf_model(tokens, position_ids=shifted).logits,
            rtol=1e-5,
            atol=1e-6,
        )
        greedy = model.generate(tokens[:, :5], 10, temperature=0)
        hf_greedy = hf_model.generate(tokens[:, :5], max_new_tokens=10, do_sample=False)
    assert torch.equal(greedy, hf_greedy)
