"""The Alibaba UserBehavior format (headerless `user_id,item_id,category_id,behavior_type,unix_ts`):
read through the tabular reader; `export_taobao_csv` writes any canonical log in it."""

from __future__ import annotations

from pathlib import Path

from uservalue.config import DataParams
from uservalue.data.sources.tabular import TabularSpec, read_amount_table
from uservalue.duck import connect, sql_string
from uservalue.io import atomic_path

TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "unix_ts")
TAOBAO_BEHAVIORS = {"pv": "view", "fav": "fav", "cart": "cart", "buy": "buy"}


def taobao_spec(params: DataParams) -> TabularSpec:
    table = params.taobao.category_amount_table
    return TabularSpec(
        columns={
            "user_id": "user_id",
            "item_id": "item_id",
            "category_id": "category_id",
            "behavior": "behavior_type",
            "ts": "unix_ts",
        },
        behaviors=TAOBAO_BEHAVIORS,
        ts_format="unix_s",
        params_hint="data.taobao",
        header=False,
        headerless_names=TAOBAO_COLUMNS,
        purchase_amount=params.taobao.purchase_amount,
        category_amounts=read_amount_table(table) if table else {},
    )


def export_taobao_csv(events: str | Path, out: str | Path) -> int:
    """Write canonical events as a Taobao UserBehavior CSV (amounts are dropped: Taobao has none)."""
    to_taobao = " ".join(f"WHEN {sql_string(c)} THEN {sql_string(t)}" for t, c in TAOBAO_BEHAVIORS.items())
    con = connect()
    try:
        with atomic_path(out) as tmp:
            con.execute(
                f"""
                COPY (
                    SELECT user_id, item_id, category_id, CASE behavior {to_taobao} END AS behavior_type,
                           epoch(ts)::BIGINT AS unix_ts
                    FROM read_parquet({sql_string(str(events))})
                ) TO {sql_string(str(tmp))} (FORMAT CSV, HEADER false)
                """
            )
        return con.execute(f"SELECT count(*) FROM read_csv({sql_string(str(out))}, header=false)").fetchone()[0]
    finally:
        con.close()
