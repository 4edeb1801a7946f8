"""A custom redistribution rule plugged into the ServerApp (README, "Customizing")."""

import numpy as np

from fl_app.server_app import make_server_app


class MoveLeastSkipped:
    """Contrarian control: move each shard's *least*-skipped samples."""

    def __init__(self, proportion: float) -> None:
        self.proportion = proportion

    def __call__(self, shards, counts, rng):
        return [
            np.empty(0, dtype=np.int64) if c is None else np.argsort(c, kind="stable")[: int(self.proportion * len(s))]
            for s, c in zip(shards, counts, strict=True)
        ]


app = make_server_app(redistribution=MoveLeastSkipped(0.25))
