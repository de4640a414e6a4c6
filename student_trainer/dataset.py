"""How the ranks of a training run obtain the prepared dataset (ckd_common.prepared,
docs/prepared-data.md): rank 0 opens it by its spec — building it once when it is missing or stale —
or checks the directory named by ``--prepared``; the other ranks then open that same directory.
Samples are memory-mapped, so no rank holds the split in memory, and the data is prepared at most
once per run however many ranks there are."""
from __future__ import annotations

from ckd_common.data import DataError
from ckd_common.prepared import PreparedData, PrepareSpec, obtain, use_prepared


def training_data(cfg, template: str, info, tokenizer, rank: int, world: int) -> PreparedData:
    """The prepared dataset of a resolved TrainConfig for the student ``info`` (ModelInfo) and its tokenizer."""
    import torch

    spec = PrepareSpec.of(cfg.data, cfg.images, template, info, cfg.max_length)
    payload: list = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            if cfg.prepared is not None:
                ds = use_prepared(cfg.prepared, spec, on_error=cfg.data_on_error)
            else:
                ds = obtain(spec, tokenizer, on_error=cfg.data_on_error, progress=cfg.progress)
            payload = [("ok", str(ds.path))]
        except Exception as e:  # noqa: BLE001 - every rank must learn that rank 0 failed, not wait for it
            error, payload = e, [("error", str(e))]
    if world > 1:
        torch.distributed.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "error":
        raise DataError(f"rank 0 could not prepare the data: {value}")
    return ds if rank == 0 else PreparedData(value)  # rank 0 checked it just now
