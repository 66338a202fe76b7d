"""Teacher labelling at the winners' scale (240k-500k pseudo-labelled pairs): a Ray Data pipeline instead of one
process. `finetune.teacher_workers=N` streams the rows through `ray.data` `map_batches` over N FoldScorer actors
(pipeline/teachers.py, passed in: each loads the teacher's base model and fold adapter once), one GPU each on a CUDA machine,
else one CPU each; `ray.init()` joins the cluster RAY_ADDRESS names, or starts a local one. Optional:
`pip install -e '.[ray]'`. The actors run the same pass as the in-process path, so the probabilities are the same
up to the batches' padding (tests/test_distill.py).
"""
from __future__ import annotations

import pandas as pd

from pipeline.data import LABEL_COLUMNS
from pipeline.errors import UserError

ROWS_PER_BATCH = 256  # rows each actor call receives; the pass batches them by tokens again


def score(frame: pd.DataFrame, scorer: type, scorer_args: dict, workers: int,
          batch_rows: int = ROWS_PER_BATCH) -> pd.DataFrame:
    """`frame`'s rows scored by `workers` actors, each a `scorer(**scorer_args)` (a callable from a frame to id +
    probabilities: teachers.FoldScorer); the result in `frame`'s order."""
    try:
        import ray
    except ImportError:
        raise UserError("finetune.teacher_workers needs Ray: pip install -e '.[ray]' (or set "
                        "finetune.teacher_workers=0 to label in this process)") from None
    import torch

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        per_worker = {"num_gpus": 1} if torch.cuda.is_available() else {"num_cpus": 1}
        # Turns are lists: they travel as Arrow lists and come back as arrays (_Actor turns them into lists again).
        dataset = ray.data.from_pandas(frame.reset_index(drop=True))
        scored = dataset.map_batches(_Actor, fn_constructor_kwargs={"scorer": scorer, "scorer_args": scorer_args},
                                     batch_format="pandas", batch_size=max(1, int(batch_rows)),
                                     concurrency=int(workers), **per_worker).to_pandas()
    finally:
        if started:
            ray.shutdown()
    scored = scored.set_index("id").loc[frame["id"].to_numpy().astype(str)].reset_index()
    return scored.astype({column: "float64" for column in LABEL_COLUMNS})


class _Actor:
    """A Ray Data actor around a scorer (built once per worker)."""

    def __init__(self, scorer: type, scorer_args: dict):
        self.scorer = scorer(**scorer_args)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        for column in ("prompt", "response_a", "response_b"):
            batch[column] = [list(turns) for turns in batch[column]]
        return self.scorer(batch)
