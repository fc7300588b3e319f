"""``personavec serve``: an OpenAI-compatible server that steers per request and reads persona scores live.

Modules:

* :mod:`~personavec.serve.schema`: the request body (OpenAI chat completions plus ``steering`` and
  ``persona_thresholds``), as pydantic models;
* :mod:`~personavec.serve.registry`: the loaded vectors, their names and read layers, and steering
  entries resolved to ``(vector, layer, coef, positions, when)``;
* :mod:`~personavec.serve.engine`: one worker thread that decodes all requests in one batch, with
  per-row steering, sampling and monitoring (continuous batching; :mod:`~personavec.serve.kvcache`);
* :mod:`~personavec.serve.events`: what goes into the engine and comes out of it;
* :mod:`~personavec.serve.app`: the FastAPI routes, limits and the web page (``page.html``).

Every response carries a ``persona`` object::

    "persona": {
      "vectors": {"evil": {"layer": 17,
                           "prompt": {"raw": 3.1, "z": 2.4, "percentile": 98.9},
                           "response_mean": 1.2,
                           "note": null}},
      "steering": [{"vector": "evil", "layer": 15, "coef": -1.42, "fraction": -0.125,
                    "positions": "response", "when": {"vector": "evil", "z_above": 2.0},
                    "applied": true}],
      "flagged": ["evil"],
      "tokens": [{"text": "Hello", "projections": {"evil": 0.3}}]
    }

``prompt`` is the last prompt token's projection at the vector's read layer (z and percentile against
its calibration, ``null`` without one, ``note`` says why); ``response_mean`` the mean projection of the
generated tokens; ``tokens`` (non-streamed replies) each token's own projection. Streamed replies carry
the prompt readings in their first chunk, ``persona.token`` (index, id, text, projections) in every
token chunk, and the whole object in the chunk with ``finish_reason``.

Positions: unconditional steering entries steer every position, prompt included (``"positions"``
changes that); conditional entries (``"when"``) are decided on the prompt's reading after the prompt
pass, so they steer generated positions only. Readings see the residual stream as the model computes it,
steering included.
"""
