"""A ClientApp for tests that plays hostile hospitals: it trains honestly with fedsynth's
ClientApp, then corrupts the reply according to its partition id (simulation) or its
``attack`` node config (deployment). Flower runs it exactly as it runs fedsynth's own."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedsynth.client.client_app import train as honest_train
from fedsynth.engine.records import ARRAYS

# By partition id: what each simulated hospital sends instead of its honest update.
ATTACKS = ("nan", "wrong-shape", "thousandfold", "honest")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest_train(msg, context)
    attack = str(context.node_config.get("attack", ATTACKS[int(context.node_config.get("partition-id", 3))]))
    if attack == "honest" or ARRAYS not in reply.content.array_records:
        return reply
    arrays = {k: v.numpy() for k, v in reply.content[ARRAYS].items()}
    first = sorted(arrays)[0]
    if attack == "nan":
        arrays[first] = np.full_like(arrays[first], np.nan)
    elif attack == "wrong-shape":
        arrays[first] = np.zeros((*arrays[first].shape, 2), dtype=arrays[first].dtype)
    elif attack == "thousandfold":
        arrays = {k: v * 1000 for k, v in arrays.items()}
    reply.content[ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return reply
