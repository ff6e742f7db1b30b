"""The coordinator's side of a federated round: what it keeps each round; and the Flower ServerApp."""
