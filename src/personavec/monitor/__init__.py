"""Stage 2: monitor prompts and generations by projecting onto persona vectors."""
