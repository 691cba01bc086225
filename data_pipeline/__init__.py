"""Raw text -> tokenizer + token shards -> batches, in the order the subpackages run:

sources/ (raw documents, one reader per file type) -> tokenizer.py -> prepare/ (`slm prepare`: the shards
and manifest, written through format/ into storage/) -> loading/ (pretraining batches from the shards);
instruct/ turns chat data into instruction-tuning batches. config.py holds the typed configs, errors.py the
DataError every module raises on bad input. Imports only common/ and model/.
"""
