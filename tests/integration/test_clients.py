"""The export in the clients a new user reaches for next: transformers (5.x here, 4.x in a throwaway venv), PEFT,
TRL, lm-evaluation-harness and llama.cpp's GGUF. Each test runs the real client on a tiny export."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from data_pipeline.instruct.chat import encode_chat_prompt, format_chat
from data_pipeline.instruct.data import read_conversations
from data_pipeline.loading.loader import build_loader
from data_pipeline.tokenizer import EOT, IM_END, load_tokenizer, model_vocab_size
from model import ModelConfig, Transformer
from model.loss import IGNORE_INDEX
from tests.helpers import SELF_INSTRUCT, SHAKESPEARE
from train.evaluate import bits_per_byte, evaluate
from train.handoff.export import export_from_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
SEQ_LEN = 128


@pytest.fixture(scope="module")
def trained(tiny_data_dir):
    """A 2-layer model trained 30 steps on tinyshakespeare (so its predictions are not uniform)."""
    tokenizer_path = tiny_data_dir / "tokenizer.json"
    cfg = ModelConfig(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        max_seq_len=SEQ_LEN,
        vocab_size=model_vocab_size(load_tokenizer(tokenizer_path)),
        init_std=0.05,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = iter(build_loader(tiny_data_dir, "train", SEQ_LEN, 8, 0, 1, 0))
    for _ in range(30):
        batch = next(loader)
        _, loss = model(batch["input_ids"], targets=batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), cfg, tokenizer_path


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    model, cfg, tokenizer_path = trained
    out = tmp_path_factory.mktemp("client_exports")
    return {
        kind: export_from_model(
            model.state_dict(), cfg, tokenizer_path, out / kind, dtype="fp32", chat=kind == "chat"
        )
        for kind in ("base", "chat")
    }


def conversations(n):
    return read_conversations(SELF_INSTRUCT)[:n]


def load(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(folder))


def greedy(model, tokenizer, prompts, n=8):
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return [row[inputs["input_ids"].shape[1] :].tolist() for row in out]


def test_transformers_generate_batch_pipeline_and_save_pretrained(exports, tmp_path):
    model, tokenizer = load(exports["base"])
    assert tokenizer.padding_side == "left" and "token_type_ids" not in tokenizer("ROMEO:")
    single = [greedy(model, tokenizer, [p])[0] for p in ("ROMEO:", "First Citizen:\nBefore we proceed")]
    # Left padding: each row of a batch continues exactly as the prompt alone does.
    assert greedy(model, tokenizer, ["ROMEO:", "First Citizen:\nBefore we proceed"]) == single
    chat_model, chat_tokenizer = load(exports["chat"])
    generator = transformers.pipeline("text-generation", model=chat_model, tokenizer=chat_tokenizer)
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = generator(messages, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert reply[:-1] == messages and reply[-1]["role"] == "assistant"
    ours = load_tokenizer(exports["chat"] / "tokenizer.json")
    prompt = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert list(prompt) == encode_chat_prompt(messages, ours)
    model.save_pretrained(str(tmp_path / "resaved"))
    tokenizer.save_pretrained(str(tmp_path / "resaved"))
    again, again_tokenizer = load(tmp_path / "resaved")
    tokens = torch.randint(0, 4000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    assert again_tokenizer.padding_side == "left" and again_tokenizer.chat_template == tokenizer.chat_template
    assert again_tokenizer("ROMEO: soft!")["input_ids"] == tokenizer("ROMEO: soft!")["input_ids"]


TRANSFORMERS_4 = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {"version": transformers.__version__}
for kind in ("base", "chat"):
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1 if kind == "base" else 2], torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1 if kind == "base" else 2])
    inputs = tokenizer(["ROMEO:", "First Citizen:"], return_tensors="pt", padding=True)
    generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    with torch.no_grad():
        logits = model(torch.arange(100, 140)[None]).logits
    out[kind] = {"generated": generated[:, inputs["input_ids"].shape[1]:].tolist(), "chat": list(chat),
                 "logits_sum": logits.double().sum().item(), "padding_side": tokenizer.padding_side}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def transformers4_python(request):
    """A venv (cached across runs in pytest's cache dir) with transformers 4.57, the low end we declare."""
    venv = request.config.cache.mkdir("transformers-4.57-venv")
    python = venv / "bin" / "python"
    if not (venv / "ready").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "transformers==4.57.*"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            pytest.skip(f"pip could not install transformers 4.57 here: {proc.stderr[-500:]}")
        (venv / "ready").write_text("ok\n")
    return python


def test_transformers_4_loads_and_generates(exports, transformers4_python, tmp_path):
    script = tmp_path / "t4.py"
    script.write_text(TRANSFORMERS_4)
    proc = subprocess.run(
        [str(transformers4_python), str(script), str(exports["base"]), str(exports["chat"])],
        capture_output=True,
        text=True,
        timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"].startswith("4.57")
    for kind in ("base", "chat"):
        model, tokenizer = load(exports[kind])
        assert result[kind]["generated"] == greedy(model, tokenizer, ["ROMEO:", "First Citizen:"], n=6)
        with torch.no_grad():
            expected = model(torch.arange(100, 140)[None]).logits.double().sum().item()
        assert result[kind]["logits_sum"] == pytest.approx(expected, rel=1e-5, abs=1e-3)
        assert result[kind]["padding_side"] == "left"
    ours = load_tokenizer(exports["chat"] / "tokenizer.json")
    assert result["chat"]["chat"] == encode_chat_prompt([{"role": "user", "content": "Hi"}], ours)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_peft_lora_trains_saves_reloads_and_merges(exports, tmp_path, targets):
    peft = pytest.importorskip("peft")
    model, tokenizer = load(exports["base"])
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    )
    batch = tokenizer(["ROMEO: But soft! what light through yonder window breaks?"] * 2, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        lora(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lora.eval()
    lora.save_pretrained(str(tmp_path / "adapter"))
    base, _ = load(exports["base"])
    with torch.no_grad():
        base_logits = base(**batch).logits
        trained_logits = lora(**batch).logits
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        adapter_logits = reloaded(**batch).logits
        merged_logits = reloaded.merge_and_unload()(**batch).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)  # the adapter learned something
    torch.testing.assert_close(adapter_logits, trained_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)


def test_trl_sft_assistant_only_loss_masks_what_ift_trains_on(exports, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    data = conversations(12)
    _, tokenizer = load(exports["base"])
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=2,
        assistant_only_loss=True,
        max_length=SEQ_LEN,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-3,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = trl.SFTTrainer(
        model=str(exports["base"]),
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"messages": m} for m in data]),
    )
    ours = load_tokenizer(exports["base"] / "tokenizer.json")
    expected = [(ids[:SEQ_LEN], labels[:SEQ_LEN]) for ids, labels in (format_chat(m, ours) for m in data)]
    expected = [(ids, labels) for ids, labels in expected if any(x != IGNORE_INDEX for x in labels)]
    got = [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]
    assert got == expected and len(got) >= 8  # TRL's labels == our IFT stage's, token for token
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    trainer.save_model(str(tmp_path / "sft_model"))
    saved = json.loads((tmp_path / "sft_model" / "generation_config.json").read_text())
    ids = {t: ours.token_to_id(t) for t in (EOT, IM_END)}
    assert (
        ids[IM_END] in saved["eos_token_id"] and ids[EOT] in saved["eos_token_id"]
    )  # stops at an answer's end


def test_trl_dpo_trains(exports, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    rows = [
        {"prompt": [m[0]], "chosen": [m[1]], "rejected": [{"role": "assistant", "content": "I don't know."}]}
        for m in conversations(8)
    ]
    model, tokenizer = load(exports["chat"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=SEQ_LEN,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-3,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows)
    )
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


MC_TASK = """task: slm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
ROLLING_TASK = """task: slm_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""
MC_DOCS = [
    {
        "question": "ROMEO: But soft! what light through yonder",
        "choices": ["window breaks?", "cheese melts.", "dog"],
        "answer": 0,
    },
    {
        "question": "First Citizen:\nBefore we proceed any further, hear me",
        "choices": ["speak.", "run fast", "eat"],
        "answer": 0,
    },
    {
        "question": "KING RICHARD III:\nNow is the winter of our",
        "choices": ["lunch", "discontent", "the car"],
        "answer": 1,
    },
]


def held_out_text(tokenizer, windows=3):
    """A held-out tinyshakespeare passage of exactly `windows` * SEQ_LEN tokens (so fixed rows cover it exactly)."""
    text = open(SHAKESPEARE, encoding="utf-8").read()[-6000:]
    n = windows * SEQ_LEN
    for start in [i + 1 for i, ch in enumerate(text) if ch == "\n"][
        :50
    ]:  # cut after n tokens of a line start
        passage = text[start:]
        cut = passage[: tokenizer.encode(passage).offsets[n - 1][1]]
        if len(tokenizer.encode(cut).ids) == n:
            return cut
    raise AssertionError("no cut of the passage has the wanted token count")


def our_loglik(model, ids, context_len):
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logprobs = torch.log_softmax(logits.double(), -1)[0]
    return sum(logprobs[i - 1, ids[i]].item() for i in range(context_len, len(ids)))


def test_lm_eval_multiple_choice_and_rolling_bits_per_byte_equal_ours(trained, exports, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, cfg, tokenizer_path = trained
    ours = load_tokenizer(tokenizer_path)
    text = held_out_text(ours)
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tmp_path / "rolling.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "mc.yaml").write_text(MC_TASK.format(data=tmp_path / "mc.jsonl"))
    (tmp_path / "rolling.yaml").write_text(ROLLING_TASK.format(data=tmp_path / "rolling.jsonl"))
    lm = HFLM(pretrained=str(exports["base"]), batch_size=1, max_length=SEQ_LEN, device="cpu")
    results = simple_evaluate(
        model=lm,
        tasks=["slm_mc", "slm_rolling"],
        log_samples=True,
        # the two tasks alone: indexing every task lm-eval ships as well takes tens of seconds on a busy machine
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    # Multiple choice: lm-eval's per-choice log-likelihoods are our model's.
    for sample in results["samples"]["slm_mc"]:
        doc = sample["doc"]
        context = ours.encode(doc["question"]).ids
        for choice, (loglik, _) in zip(doc["choices"], sample["filtered_resps"]):
            whole = ours.encode(doc["question"] + " " + choice).ids
            assert loglik == pytest.approx(our_loglik(model, whole, len(context)), abs=1e-4)
    # Rolling log-likelihood: bits per byte over the passage == our val_bpb on the same tokens, in fixed rows.
    tokens = torch.tensor([ours.token_to_id(EOT)] + ours.encode(text).ids)
    rows = torch.stack([tokens[i * SEQ_LEN : (i + 1) * SEQ_LEN + 1] for i in range(3)])
    bytes_per_token = len(text.encode("utf-8")) / (len(tokens) - 1)
    val = evaluate(
        model, [{"input_ids": rows[:, :-1], "labels": rows[:, 1:]}], torch.device("cpu"), bytes_per_token
    )
    assert val["val_bpb"] == pytest.approx(bits_per_byte(val["val_loss"], bytes_per_token))
    assert results["results"]["slm_rolling"]["bits_per_byte,none"] == pytest.approx(val["val_bpb"], abs=1e-3)
    assert abs(results["results"]["slm_rolling"]["bits_per_byte,none"] - val["val_bpb"]) < 1e-4


def deinterleave_rope_rows(weight, n_heads):
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_gguf_export_reads_back_with_the_same_logits_and_tokens(trained, tmp_path):
    gguf = pytest.importorskip("gguf")
    from train.handoff.gguf_export import gguf_name

    model, cfg, tokenizer_path = trained
    out = export_from_model(
        model.state_dict(), cfg, tokenizer_path, tmp_path / "export", dtype="fp32", gguf=True
    )
    reader = gguf.GGUFReader(str(out / "model.gguf"))

    def field(name):
        f = reader.fields[name]
        return [
            bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0]
            for i in f.data
        ]

    assert field("general.architecture") == ["llama"] and field("tokenizer.ggml.pre") == ["gpt-2"]
    ours = load_tokenizer(tokenizer_path)
    vocab = {i: t for t, i in ours.get_vocab(with_added_tokens=True).items()}
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == t for i, t in vocab.items())
    merges = json.loads(tokenizer_path.read_text())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert field("tokenizer.ggml.eos_token_id") == [ours.token_to_id(EOT)]
    # Our model rebuilt from the GGUF's tensors (q/k rows back in rotate_half order): the same logits.
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    state_dict = {}
    for name, reference in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensors[gguf_name(name)].reshape(reference.shape)
        if name.endswith("q_proj.weight"):
            tensor = deinterleave_rope_rows(tensor, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = deinterleave_rope_rows(tensor, cfg.n_kv_heads)
        state_dict[name] = tensor
    rebuilt = Transformer(cfg)
    rebuilt.load_state_dict(state_dict, strict=False)
    rebuilt.lm_head.weight = rebuilt.embed_tokens.weight
    ids = ours.encode("ROMEO: But soft! what light through yonder window breaks?").ids
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt.eval()(torch.tensor([ids]))[0], model(torch.tensor([ids]))[0], rtol=0, atol=0
        )
    try:
        from llama_cpp import Llama
    except ImportError:
        return  # llama-cpp-python is not installed: the file was checked by reading it back
    # llama.cpp itself (llama-cpp-python, built from source: optional, used when installed).
    llm = Llama(model_path=str(out / "model.gguf"), n_ctx=SEQ_LEN, logits_all=True, verbose=False)
    text = "ROMEO: But soft! café 🚀\n\n<|im_start|>user\nhi<|im_end|>\n<|endoftext|>KING:"
    ids = ours.encode(text).ids
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0]
    got = torch.tensor(llm.scores[: len(ids)])
    llm.close()
    # ggml's fp32 kernels round differently: measured 2e-3 x the logits' std on this model; allowed 1e-2.
    assert (got - expected).abs().max().item() < 1e-2 * expected.std().item()


def test_slm_export_gguf_command_writes_a_bf16_chat_gguf(exports, tmp_path):
    gguf = pytest.importorskip("gguf")
    from launch.cli import main as slm_main

    assert slm_main(["export", str(exports["chat"]), str(tmp_path / "re"), "--dtype", "bf16", "--gguf"]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "re" / "model.gguf"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.BF16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == load_tokenizer(tmp_path / "re" / "tokenizer.json").token_to_id(
        IM_END
    )
    assert "endgeneration" not in bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()
    assert "Instruction-tuned chat" in (tmp_path / "re" / "README.md").read_text()
