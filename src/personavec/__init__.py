"""personavec: persona vectors for language models.

The folders read as the mission. ``core/`` holds the mechanics that know no stage: load a chat model
(``models``), render chats to tokens (``conversations``), capture and pool the residual stream
(``activations``), the vector object and file (``vectors``), add or ablate it (``steering``). Each
stage is a wing over ``core``: ``extract/`` (trait answers, filtering, difference of means, the whole
run), ``steer/`` (read-back, the dose-response sweep, the demo), ``monitor/`` (projections, the
monitoring experiment), beside ``traits/`` (specs and authors), ``judging/``, ``reports/`` and the
``cli/``. Layer indices everywhere follow :mod:`personavec.core.layers`: 0 = embeddings, l = output of
decoder block l.
"""

__version__ = "0.1.0"
