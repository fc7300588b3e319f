"""Judges: score answers 0-100 for a trait and for coherence (see :mod:`personavec.judging.base`)."""
