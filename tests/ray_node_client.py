"""A ClientApp for the Ray cluster test: fedsynth's own ClientApp, which also appends the
Ray node it ran on to the file named by FEDSYNTH_TEST_RAY_NODES."""

from __future__ import annotations

import os

import ray
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsynth.client.client_app import train as fedsynth_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = fedsynth_train(msg, context)
    with open(os.environ["FEDSYNTH_TEST_RAY_NODES"], "a") as out:
        out.write(ray.get_runtime_context().get_node_id() + "\n")
    return reply
