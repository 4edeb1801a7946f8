"""IET-AGC+ over your own Flower strategy: FedAvg of the shard models after clipping each shard's
update to a maximum norm, so that no single shard can drag the global model far."""

import numpy as np
from flwr.app import Array
from flwr.serverapp.strategy import FedAvg

from fl_app.server_app import make_server_app


class ClippedFedAvg(FedAvg):
    """FedAvg whose every shard update (its weights minus the round's) is clipped to ``max_norm``."""

    def __init__(self, max_norm: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_norm = max_norm

    def configure_train(self, server_round, arrays, config, grid):
        self.round_weights = {k: a.numpy() for k, a in arrays.items()}  # what every shard started from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for msg in replies:
            record = msg.content[self.arrayrecord_key]
            update = {k: record[k].numpy() - w for k, w in self.round_weights.items()}
            norm = np.sqrt(sum(float((u**2).sum()) for u in update.values()))
            scale = min(1.0, self.max_norm / max(norm, 1e-12))
            for k, u in update.items():
                record[k] = Array(self.round_weights[k] + scale * u)
        return super().aggregate_train(server_round, replies)


# The shard layer places the shards itself: let the strategy take the nodes it is shown.
aggregator = ClippedFedAvg(max_norm=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
app = make_server_app(aggregator=aggregator)
