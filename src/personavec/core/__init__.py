"""Mechanics that know no stage: models, layers, conversations, activations, vectors, steering."""
