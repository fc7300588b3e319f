"""Stage 1: describe a trait, get a vector (trait answers, filtering, difference of means, the run)."""
