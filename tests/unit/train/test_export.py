"""`slm export`: ZeRO checkpoints written by 2 processes -> Hugging Face Llama folders that transformers loads
with the same logits and the same tokenization (chat template included)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from common.atomic import FILE_MODE
from data_pipeline.instruct.chat import CHAT_TEMPLATE, encode_chat_prompt, format_chat
from data_pipeline.tokenizer import (
    EOT,
    IM_END,
    IM_START,
    PAD,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from launch.cli import main as slm_main
from tests.zero_checkpoints import build_checkpoints, step_dir
from train.checkpoint import consolidate_checkpoint
from train.errors import TrainError
from train.handoff.export import export, verify_export
from train.handoff.hf_format import special_ids, tokenizer_config
from train.handoff.init_from import load_init_weights

transformers = pytest.importorskip("transformers")

VARIANTS = ("zero3_tied_gqa", "zero3_untied_mha", "zero2_bf16_untied_gqa")


@pytest.fixture(scope="module")
def tokenizer_path(tiny_data_dir):
    return tiny_data_dir / "tokenizer.json"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_path):
    return build_checkpoints(tmp_path_factory, tokenizer_path)


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    """Each variant exported in fp32 from its run dir (verified against transformers inside export)."""
    out = tmp_path_factory.mktemp("exports")
    return {name: export(checkpoints / name, out / name, dtype="fp32") for name in VARIANTS}


def hf_logits(folder, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).float().eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["zero3_tied_gqa", "zero3_untied_mha"])
def test_zero3_export_matches_the_live_engine_in_transformers(checkpoints, exports, variant):
    reference = load_file(str(checkpoints / variant / "reference.safetensors"))
    tokens = reference["tokens"][:, :-1]
    logits = hf_logits(exports[variant], tokens)
    # The engine's own logits on 2 ZeRO-3 ranks, before saving; transformers on the export: the same numbers.
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), reference["tokens"][:, 1:].flatten())
    assert loss.item() == pytest.approx(reference["loss"].item(), abs=1e-5)


@pytest.mark.slow
def test_export_files_and_config(checkpoints, exports, tokenizer_path):
    tied, untied, bf16_run = (
        exports["zero3_tied_gqa"],
        exports["zero3_untied_mha"],
        exports["zero2_bf16_untied_gqa"],
    )
    expected_files = {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "slm_export.json",
    }
    for folder in exports.values():
        assert {p.name for p in folder.iterdir()} == expected_files  # no pickle, no leftovers
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert set(modes.values()) == {FILE_MODE}, f"every file of an export has one mode: {modes}"
    assert not list(tied.parent.glob(".*tmp"))  # the atomic temp folders are gone
    config = json.loads((tied / "config.json").read_text())
    ids = special_ids(tokenizer_path)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 96, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (
        4,
        2,
        4096,
    )
    assert config["torch_dtype"] == "float32" and config["max_position_embeddings"] == 64
    assert (config["bos_token_id"], config["eos_token_id"]) == (ids[EOT], ids[EOT])
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))  # tied: stored once, like HF
    untied_config = json.loads((untied / "config.json").read_text())
    assert untied_config["tie_word_embeddings"] is False and untied_config["num_key_value_heads"] == 4
    assert untied_config["eos_token_id"] == ids[IM_END]  # an ift checkpoint exports as a chat model
    assert json.loads((untied / "tokenizer_config.json").read_text())["eos_token"] == IM_END
    generation = json.loads((tied / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids[EOT], ids[IM_END]]
    assert (tied / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    card = (tied / "README.md").read_text()  # the model card, from the checkpoint's meta.json
    assert "optimizer steps: 2" in card and "tokens trained: 256" in card and "Base (pretrained)" in card
    assert "Instruction-tuned chat" in (untied / "README.md").read_text()
    tokenizer_cfg = json.loads((tied / "tokenizer_config.json").read_text())
    assert (
        tokenizer_cfg["model_input_names"] == ["input_ids", "attention_mask"]
        and tokenizer_cfg["padding_side"] == "left"
    )
    # zero_to_fp32 recovers the fp32 master weights of a bf16 ZeRO-2 run; the export holds exactly those.
    masters = consolidate_checkpoint(step_dir(checkpoints, "zero2_bf16_untied_gqa"))
    exported, _, sha = load_init_weights(bf16_run)
    assert all(torch.equal(exported[name], masters[name]) for name in masters)
    assert masters["embed_tokens.weight"].dtype == torch.float32
    assert not torch.equal(masters["embed_tokens.weight"], masters["embed_tokens.weight"].bfloat16().float())
    reference = load_file(str(checkpoints / "zero2_bf16_untied_gqa" / "reference.safetensors"))
    torch.testing.assert_close(
        hf_logits(bf16_run, reference["tokens"][:, :-1]), reference["logits"], rtol=0, atol=0.1
    )


@pytest.mark.slow
def test_sharded_bf16_export_round_trips(checkpoints, tmp_path):
    src = step_dir(checkpoints, "zero3_untied_mha")
    out = export(src, tmp_path / "sharded", dtype="bf16", max_shard_bytes=150_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (
        "lm_head.weight" in index["weight_map"]
        and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    )
    weights, cfg, sha = load_init_weights(out)
    original, original_cfg, original_sha = load_init_weights(src)
    assert cfg.ffn_hidden_size == original_cfg.ffn_hidden_size and cfg.n_kv_heads == 4 and sha == original_sha
    for name, tensor in original.items():
        assert weights[name].dtype == torch.bfloat16 and torch.equal(weights[name], tensor.bfloat16())
    # A folder transformers itself saved (e.g. after fine-tuning with TRL) loads back too.
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    hf_model.save_pretrained(str(tmp_path / "resaved"))
    resaved, resaved_cfg, resaved_sha = load_init_weights(tmp_path / "resaved")
    assert resaved_sha is None and resaved_cfg.n_kv_heads == 4
    assert all(torch.equal(resaved[name].float(), weights[name].float()) for name in original)
    # The command line, over a previous export: only with --force, and never over a file the export did not write.
    assert slm_main(["export", str(src), str(out), "--dtype", "fp32"]) == 2
    (out / "stale.bin").write_bytes(b"x")
    assert slm_main(["export", str(src), str(out), "--dtype", "fp32", "--force"]) == 2
    assert (out / "stale.bin").read_bytes() == b"x"
    (out / "stale.bin").unlink()
    assert slm_main(["export", str(src), str(out), "--dtype", "fp32", "--force"]) == 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("model-*.safetensors"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_exported_tokenizer_and_chat_template_match_ours(tokenizer_path, tmp_path):
    """Only the tokenizer files: transformers' tokenizer, its special tokens and apply_chat_template."""
    ids = special_ids(tokenizer_path)
    shutil.copyfile(tokenizer_path, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(ids, 128, chat=True)))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tokenizer_path)
    sample = (
        f"{EOT}First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:  Speak, speak. 123 "
        f"naïve café 🚀\t{IM_START}user\nhi{IM_END}\n{PAD}"
    )
    expected = ours.encode(sample, add_special_tokens=False).ids
    assert theirs(sample)["input_ids"] == expected  # add_special_tokens=True adds nothing either
    assert [i for i in expected if i in ids.values()] == [ids[EOT], ids[IM_START], ids[IM_END], ids[PAD]]
    assert (theirs.eos_token, theirs.pad_token, theirs.eos_token_id) == (IM_END, PAD, ids[IM_END])
    assert theirs.chat_template == CHAT_TEMPLATE
    conversations = [
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And its population?"},
            {"role": "assistant", "content": "About 2.1 million."},
        ],
        [
            {"role": "system", "content": "Answer in verse.\n"},
            {"role": "user", "content": "  Why is the sky blue?\n\n"},
            {
                "role": "assistant",
                "content": "\nThe air scatters blue light more than red —\nso blue is overhead.  ",
            },
        ],
    ]
    for conversation in conversations:
        text = theirs.apply_chat_template(conversation, tokenize=False)
        got = theirs.apply_chat_template(conversation)
        got = got["input_ids"] if hasattr(got, "keys") else got
        assert list(got) == format_chat(conversation, ours)[0], text
        prompt = theirs.apply_chat_template(conversation[:-1], add_generation_prompt=True)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        assert list(prompt) == encode_chat_prompt(conversation[:-1], ours)


@pytest.mark.slow
def test_verification_fails_loudly_on_a_wrong_conversion(checkpoints, exports, tmp_path, tiny_data_dir):
    src = step_dir(checkpoints, "zero3_tied_gqa")
    state_dict, cfg, _ = load_init_weights(src)
    broken = tmp_path / "broken"
    shutil.copytree(exports["zero3_tied_gqa"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = config["rope_theta"] = 500.0  # a wrong conversion
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainError, match="logits differ from ours"):
        verify_export(broken, state_dict, cfg, tiny_data_dir / "tokenizer.json")
    other_tokenizer = (
        tmp_path / "other_tokenizer.json"
    )  # the export's tokenizer is not the one of these weights
    save_tokenizer(
        train_tokenizer(["ROMEO: But soft! what light through yonder window breaks?"] * 20, 300),
        other_tokenizer,
    )
    with pytest.raises(TrainError, match="tokenizer"):
        verify_export(exports["zero3_tied_gqa"], state_dict, cfg, other_tokenizer)


def test_bad_sources_are_clear_errors(tmp_path, capsys):
    with pytest.raises(TrainError, match="does not exist"):
        export(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(TrainError, match="holds no complete checkpoint"):
        export(tmp_path / "empty_run", tmp_path / "out")
    assert slm_main(["export", str(tmp_path / "empty_run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_attention_heads": 4,
                "num_hidden_layers": 1,
                "hidden_size": 64,
                "intermediate_size": 96,
                "vocab_size": 64,
                "max_position_embeddings": 32,
                "rms_norm_eps": 1e-5,
            }
        )
    )
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(TrainError, match="pickled weights are refused"):
        load_init_weights(tmp_path / "pickled")
