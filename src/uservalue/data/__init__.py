"""Getting events in: sources into the canonical table, and the validation gate."""
