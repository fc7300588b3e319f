"""Screen training data before anyone trains on it: the projection difference per sample and per dataset.

For each sample (a prompt and the dataset's response) and each persona vector, at the vector's layer:

* ``projection``: the response-token mean of the dataset's response, read under the sample's own prompt,
  projected onto the unit direction (:func:`personavec.core.steering.project`);
* ``own_projection``: the same for the model's own greedy answer to that prompt (generated once and
  cached), or with ``cheap`` the last prompt token's projection standing in for it (the paper's
  Appendix I approximation: no generation);
* ``projection_difference``: ``projection - own_projection``, the paper's measure of how far training on
  the sample would pull the model along the trait.

The steps, one public function each: ``samples.iter_samples`` (stream the data), ``vectors.resolve_vectors``
(``V[@LAYER]``), ``scoring.score_batch`` (one batch on one model replica: the unit a Ray actor runs),
``run.screen`` (the driver: streams batches, writes records in input order, resumes),
``stats.dataset_scores``, ``filtering.write_filtered`` and ``report.write_screen_report``.
"""
