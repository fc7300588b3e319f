"""personavec: persona vectors for language models.

The data flows through one module per stage: :mod:`~personavec.models` (load a chat model) ->
:mod:`~personavec.conversations` (render chats to tokens) -> :mod:`~personavec.activations` (capture and
pool the residual stream) -> :mod:`~personavec.vectors` (the vector object and file) ->
:mod:`~personavec.steering` (add or ablate it during generation or training). Layer indices everywhere
follow :mod:`personavec.layers`: 0 = embeddings, l = output of decoder block l.
"""

__version__ = "0.1.0"
