"""Stage 4: fine-tune with persona vectors in view: trait datasets, LoRA with preventative steering, shift."""
