"""The hand-off: weights in and out of training.

`init_from` (weights from a checkpoint or an export, for cpt/ift, export and generate), `hf_format` (our names and
shapes <-> Hugging Face LlamaForCausalLM), `export` (`slm export`) and `generate` (`slm generate`).
"""
