"""A hospital's side of a federated round: its data, its private state, its training; and the Flower
ClientApp."""
