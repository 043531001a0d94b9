"""The featurize stage with item text (issue 23): `with_text_join(featurize)` is the featurize command plus
`--item-vectors` (the embed_items stage's output); after the command wrote the feature sets it joins the
pooled text columns (uservalue.text.features.join_text_feature_sets). An empty vectors table (a log without
item text) leaves the feature sets exactly as the command wrote them."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uservalue.cli.common import err, path_option, reports_errors

ITEM_VECTORS = "item_vectors"


def with_text_join(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` (a featurize command with `events` and `out_dir` options) with an `--item-vectors` option."""
    base = inspect.signature(command, eval_str=True)
    option = inspect.Parameter(ITEM_VECTORS, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                               default=path_option("data/item_vectors.parquet",
                                                   "Item vectors (embed_items; empty: no text features)."))
    signature = base.replace(parameters=[*base.parameters.values(), option])

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        item_vectors = kwargs.pop(ITEM_VECTORS)
        command(**kwargs)
        _join(kwargs["out_dir"], kwargs["events"], item_vectors)

    run.__signature__ = signature  # type: ignore[attr-defined]
    run.__annotations__ = {name: p.annotation for name, p in signature.parameters.items()} | {"return": None}
    del run.__wrapped__  # typer reads __signature__, not the wrapped command's
    return run


@reports_errors
def _join(out_dir: Path, events: Path, item_vectors: Path) -> None:
    from uservalue.text.features import join_text_feature_sets

    if events.name.endswith(".manifest.json"):  # an external log (uservalue.data.manifest): its verified Parquet
        from uservalue.data.manifest import resolve_input

        events = resolve_input(events)
    join_text_feature_sets(out_dir, events, item_vectors,
                           log=lambda line: err.print(f"featurize: {line}", markup=False, soft_wrap=True))


__all__ = ["with_text_join"]
