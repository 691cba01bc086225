"""`slm train` on a data.dir that holds no prepared data yet: prepare it first, on rank 0 while the other
ranks wait, then train. train/ itself only reads prepared data (and says so when data.dir has none).

Every rank looks for manifest.json; only when it is missing is the process group started here (rank 0
prepares, its error reaches every rank as a TrainError), and `run_training` then finds it started.
"""

from __future__ import annotations

from common.log import say
from data_pipeline.format.names import MANIFEST
from data_pipeline.prepare.dispatch import prepare
from data_pipeline.storage.store import DataStore
from train.config import Config
from train.distributed import barrier, on_main_then_share, setup_distributed, teardown_distributed


def prepare_missing_data(cfg: Config) -> None:
    """Prepare data.dir (a local folder or URL) when it has no manifest: rank 0 prepares, the others wait."""
    data_dir = DataStore(cfg.data.dir, cfg.data.storage_options)
    if data_dir.exists(MANIFEST):
        return

    def prepare_data() -> None:
        say(f"{data_dir}/{MANIFEST} not found: preparing the data now (rank 0; other ranks wait)")
        prepare(cfg.data, cfg.tokenizer)

    dist_info = setup_distributed(cfg.train)
    try:
        on_main_then_share(dist_info, prepare_data, "Preparing the data")
        barrier()
    except BaseException:
        teardown_distributed()
        raise
