"""DVC stage `embed_items` (issue 23): each distinct item text -> a vector (params `embed_items`) ->
data/item_vectors.parquet, with its counts, time and texts/s in reports/embed_items.json. A log without
item text gives an empty table and says why (the model is not loaded)."""

import sys
from pathlib import Path

from uservalue.cli.common import ParamsOption, err, load, path_option, reports_errors, run_one

EVENTS = path_option("data/validated.parquet", "Validated canonical events (item_text optional).")
OUT = path_option("data/item_vectors.parquet", "Output: item_id -> vector (Parquet).")
SUMMARY = path_option("reports/embed_items.json", "Output: counts, time, texts/s (JSON).")


@reports_errors
def embed_items(
    params: ParamsOption = Path("params.yaml"),
    events: Path = EVENTS,
    out: Path = OUT,
    summary: Path = SUMMARY,
) -> None:
    """Embed every distinct item text with the shipped all-MiniLM-L6-v2 (cached by text hash)."""
    from uservalue.io import write_json
    from uservalue.text.embed import embed_items as run

    cfg = load(params)
    result = run(events, out, cfg.embed_items, log=lambda line: err.print(line, markup=False, soft_wrap=True))
    write_json(summary, result.as_dict())


if __name__ == "__main__":
    run_one(embed_items, sys.argv[1:], prog_name="pipelines/embed_items.py")
