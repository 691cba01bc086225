"""`slm prepare` into a local (or shared POSIX) data.dir: under the folder's lock, a complete folder that
matches the config is reported complete, an interrupted one resumes from its last commit, and a fresh one
is claimed and prepared (engine.py does the work). remote.py prepares a URL data.dir through `prepare_into`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from common.files import file_sha256
from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.format.manifest import Manifest, load_manifest, verify_dataset
from data_pipeline.format.names import MANIFEST, STATE, TOKENIZER, WORK_DIR
from data_pipeline.prepare.common import (
    check_same_origin,
    claim_fresh_data_dir,
    prepare_fingerprint,
    prepare_lock,
    read_prepare_state,
    report_complete,
    resolve_num_proc,
)
from data_pipeline.prepare.engine import PrepareRun
from data_pipeline.prepare.tokenizer import obtain_tokenizer
from data_pipeline.sources.corpus import source_names
from data_pipeline.tokenizer import load_tokenizer, tokenizers_single_threaded


def prepare_local(data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig) -> Path:
    """Prepare data.dir (a local folder) completely, or say it is complete already; idempotent and resumable."""
    data_dir = Path(data_cfg.dir)
    source_names(data_cfg.sources)
    tokenizers_single_threaded()  # forked workers must not inherit Rust threads
    with prepare_lock(data_dir):
        fingerprint = prepare_fingerprint(data_cfg, tokenizer_cfg)
        if (data_dir / MANIFEST).exists():
            manifest = load_manifest(data_dir)
            check_same_origin(
                manifest.path,
                data_dir,
                manifest.prepared_from,
                manifest.tokenizer_sha256,
                fingerprint,
                tokenizer_cfg,
            )
            verify_dataset(manifest)
            report_complete(data_dir, manifest)
            return data_dir
        if not (data_dir / WORK_DIR / STATE).exists():
            claim_fresh_data_dir(data_dir)  # never write over files an earlier prepare did not write
        prepare_into(data_cfg, tokenizer_cfg, data_dir, fingerprint)
    return data_dir


def prepare_into(
    data_cfg: DataConfig,
    tokenizer_cfg: TokenizerConfig,
    data_dir: Path,
    fingerprint: Dict[str, Any],
    publisher: Any = None,
) -> Manifest:
    """Start or resume the prepare in the local folder data_dir (the caller holds its lock). A publisher
    (remote.Publisher) uploads the tokenizer and each shard as it is sealed, and the manifest last."""
    num_proc = resolve_num_proc(data_cfg.num_proc)
    state_path = data_dir / WORK_DIR / STATE
    if state_path.exists():
        state = read_prepare_state(state_path)
        check_same_origin(
            state_path,
            data_dir,
            state["prepared_from"],
            state["tokenizer_sha256"],
            fingerprint,
            tokenizer_cfg,
        )
        tokenizer_path = data_dir / TOKENIZER
        if not tokenizer_path.is_file() or file_sha256(tokenizer_path) != state["tokenizer_sha256"]:
            raise DataError(
                f"{tokenizer_path} is missing or is not the tokenizer (sha256 {state['tokenizer_sha256']}) that the "
                f"interrupted prepare recorded in {state_path}; delete {data_dir} and prepare again."
            )
        tokenizer, sha = load_tokenizer(tokenizer_path), state["tokenizer_sha256"]
    else:
        tokenizer, sha = obtain_tokenizer(data_cfg, tokenizer_cfg, data_dir, num_proc)
    if publisher is not None:
        publisher.tokenizer(data_dir / TOKENIZER)
    run = PrepareRun(data_cfg, data_dir, tokenizer, sha, fingerprint, num_proc)
    run.publisher = publisher
    return run.run()
