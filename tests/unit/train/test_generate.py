"""`slm generate`: the same greedy text from a run dir, a checkpoint folder and an export, equal to transformers'."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline.tokenizer import EOT, PAD, load_tokenizer
from launch.cli import main as slm_main
from model import ModelConfig, Transformer
from tests.helpers import run, slm_cmd
from tests.zero_checkpoints import build_checkpoints, step_dir
from train.errors import TrainError
from train.handoff.export import export
from train.handoff.generate import generate_cli, generate_ids
from train.handoff.init_from import build_model, load_init_weights


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_data_dir):
    checkpoints = build_checkpoints(tmp_path_factory, tiny_data_dir / "tokenizer.json")
    run_dir = checkpoints / "zero3_tied_gqa"
    exported = export(run_dir, tmp_path_factory.mktemp("generate") / "export", dtype="fp32")
    return {"run": run_dir, "step": step_dir(checkpoints, "zero3_tied_gqa"), "export": exported}


@pytest.mark.slow
def test_greedy_matches_transformers_generate(sources):
    transformers = pytest.importorskip("transformers")
    tokenizer = load_tokenizer(sources["export"] / "tokenizer.json")
    prompt = tokenizer.encode("ROMEO: But soft, what light").ids
    state_dict, cfg, _ = load_init_weights(sources["run"])
    eot = tokenizer.token_to_id(EOT)
    ours = generate_ids(
        build_model(state_dict, cfg), prompt, 16, temperature=0, top_k=None, eos_id=eot, seed=0
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(sources["export"]), dtype=torch.float32)
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=eot,
        pad_token_id=tokenizer.token_to_id(PAD),
    )
    theirs = out[0, len(prompt) :].tolist()
    assert ours == (theirs[: theirs.index(eot)] if eot in theirs else theirs) and len(ours) > 0


@pytest.mark.slow
def test_cli_prints_prompt_and_continuation_from_every_kind_of_source(sources, capsys):
    outputs = []
    for source in ("run", "step", "export"):
        assert generate_cli(sources[source], "ROMEO:", max_new_tokens=8, temperature=0) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("ROMEO:") and len(outputs[0]) > len("ROMEO:\n")
    assert outputs[0] == outputs[1] == outputs[2]
    generate_cli(sources["export"], "Hello", chat=True, max_new_tokens=4, temperature=0)
    chat = capsys.readouterr().out
    assert chat.startswith("user: Hello\nassistant:")
    sampled = []
    for _ in range(2):
        generate_cli(sources["export"], "ROMEO:", max_new_tokens=12, temperature=1.0, top_k=50, seed=3)
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1]  # seeded
    # The real command line, in its own process, prints the same greedy text.
    proc = run(
        slm_cmd(
            [
                "generate",
                str(sources["export"]),
                "--prompt",
                "ROMEO:",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0",
            ]
        )
    )
    assert proc.stdout == outputs[0], (
        "stdout carries the generated text only (DeepSpeed's lines go to stderr)"
    )
    # A huge --max-new-tokens is capped at the model's context, said on stderr, and the text still streams.
    assert generate_cli(sources["export"], "ROMEO:", max_new_tokens=10**9, temperature=1.0, seed=1) == 0
    captured = capsys.readouterr()
    context = json.loads((sources["export"] / "config.json").read_text())["max_position_embeddings"]
    assert f"--max-new-tokens 1000000000 capped at the model's context, {context} tokens" in captured.err
    assert captured.out.startswith("ROMEO:") and "[slm]" not in captured.out


def test_generation_stops_at_the_stop_token():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, vocab_size=128, max_seq_len=32, init_std=0.5
        )
    ).eval()
    prompt = [5, 6, 7]
    greedy = generate_ids(model, prompt, 6, temperature=0, top_k=None, eos_id=127, seed=0)
    assert len(greedy) == 6 or greedy[-1] != 127  # the stop token itself is never returned
    assert generate_ids(model, prompt, 6, temperature=0, top_k=None, eos_id=greedy[0], seed=0) == []
    stop = greedy[2]
    assert (
        generate_ids(model, prompt, 6, temperature=0, top_k=None, eos_id=stop, seed=0)
        == greedy[: greedy.index(stop)]
    )


def test_tiny_temperatures_sample_the_best_token():
    """A temperature as small as 1e-45 divides the logits into infinities: shifted first, it stays greedy."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, vocab_size=128, max_seq_len=32, init_std=0.5
        )
    ).eval()
    greedy = generate_ids(model, [5, 6, 7], 6, temperature=0, top_k=None, eos_id=127, seed=0)
    for temperature in (1e-45, 1e-30, 5e-324):
        assert (
            generate_ids(model, [5, 6, 7], 6, temperature=temperature, top_k=3, eos_id=127, seed=0) == greedy
        )


def test_streamed_text_is_the_decoded_text(tiny_data_dir, capsys):
    """Tokens printed as they come add up to the decode of them all, a UTF-8 character split over tokens included."""
    from train.handoff.generate import TextStream

    tokenizer = load_tokenizer(tiny_data_dir / "tokenizer.json")
    ids = tokenizer.encode("  Où est la café? ROMEO: ☃ done  ").ids
    for strip in (False, True):
        stream = TextStream(tokenizer, strip=strip)
        for token_id in ids:
            stream(token_id)
        stream.finish()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert capsys.readouterr().out == (text.strip() if strip else text) + "\n"


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    with pytest.raises(TrainError, match="temperature"):
        generate_cli(tmp_path, "x", temperature=-1)
    with pytest.raises(TrainError, match="top-k"):
        generate_cli(tmp_path, "x", top_k=0)
    assert slm_main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
