"""Property-based: random jsonl lines and random manifest edits give a result or a DataError, never a traceback,
and a manifest never makes the loader read outside the dataset folder."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.errors import DataError
from data_pipeline.instruct.data import read_conversations
from data_pipeline.loading.loader import build_loader

TEXT = st.text(max_size=12)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "bot", 3]),
        "content": st.one_of(TEXT, st.none(), st.integers()),
    }
)
RECORD = st.one_of(
    JSON,
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4)}),
    st.fixed_dictionaries(
        {"instruction": st.one_of(TEXT, st.integers()), "output": st.one_of(TEXT, st.none())}
    ),
    st.fixed_dictionaries(
        {
            "instruction": TEXT,
            "instances": st.lists(
                st.fixed_dictionaries(
                    {"input": st.one_of(TEXT, st.none()), "output": st.one_of(TEXT, st.integers())}
                ),
                max_size=3,
            ),
        }
    ),
)
LINE = st.one_of(RECORD.map(json.dumps), st.text(max_size=20))
FUZZ = settings(
    max_examples=int(os.environ.get("SLM_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(lines=st.lists(LINE, max_size=5))
def test_random_instruction_files_parse_or_name_the_problem(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        conversations = read_conversations(str(path))
    except DataError as err:
        assert str(err) and "Traceback" not in str(err)
        return
    for conversation in conversations:
        assert any(m["role"] == "assistant" for m in conversation)
        assert all(isinstance(m["content"], str) for m in conversation)


EDITS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "dtype",
                "vocab_size",
                "eot_id",
                "format_version",
                "shard_tokens",
                "tokenizer_sha256",
                "shard.file",
                "shard.tokens",
                "shard.dtype",
                "shard.split",
                "shard.source",
                "shard.index",
                "shard.sha256",
                "drop_shard",
                "drop_key",
                "sources",
            ]
        ),
        st.one_of(
            JSON,
            st.sampled_from(
                [
                    "../outside.bin",
                    "/etc/passwd",
                    "uint8",
                    "uint32",
                    -1,
                    0,
                    10**12,
                    "val",
                    "../../x",
                    "sub/../../y",
                ]
            ),
        ),
    ),
    min_size=1,
    max_size=3,
)


@pytest.fixture(scope="module")
def dataset(tiny_data_dir, tmp_path_factory):
    """A copy of the tiny dataset with a decoy file just outside it."""
    root = tmp_path_factory.mktemp("manifest_fuzz")
    shutil.copytree(tiny_data_dir, root / "data")
    (root / "outside.bin").write_bytes(b"\x01\x00" * 4096)
    return root / "data"


def apply(manifest: dict, key: str, value) -> None:
    shards = manifest["shards"]
    if key == "drop_shard" and shards:
        shards.pop(0)
    elif key == "drop_key":
        manifest.pop(str(value), None) if not isinstance(value, (dict, list)) else manifest.pop(
            "sources", None
        )
    elif key.startswith("shard.") and shards:
        shards[0][key[6:]] = value
    else:
        manifest[key] = value


@FUZZ
@given(edits=EDITS)
def test_random_manifest_edits_are_refused_or_load_unchanged(dataset, edits):
    original = (dataset / "manifest.json").read_text()
    manifest = json.loads(original)
    for key, value in edits:
        apply(manifest, key, value)
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    try:
        loader = build_loader(dataset, "val", 16, 2, 0, 1, seed=0)
        for path in loader.dataset.streams[0].paths if loader.dataset.streams else []:
            assert path.resolve().is_relative_to(dataset.resolve())  # never outside the dataset folder
        next(loader)
    except DataError as err:
        assert str(err) and "Traceback" not in str(err)
    finally:
        (dataset / "manifest.json").write_text(original)


def test_a_shard_listed_twice_is_refused(dataset):
    """A manifest that lists one shard many times would feed its windows that many times: refused by name."""
    original = (dataset / "manifest.json").read_text()
    manifest = json.loads(original)
    manifest["shards"] += [dict(manifest["shards"][0]) for _ in range(3)]
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    try:
        with pytest.raises(
            DataError, match=f"shard file '{manifest['shards'][0]['file']}' is listed 4 times"
        ):
            build_loader(dataset, "train", 16, 2, 0, 1, seed=0)
    finally:
        (dataset / "manifest.json").write_text(original)
