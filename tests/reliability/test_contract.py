"""The served OpenAPI document is the service's exact contract: schemathesis (positive and negative
data, every documented operation) finds no server error, no undocumented status, no response that breaks
its schema, no schema-violating request accepted, and its valid requests reach scoring (200 from /predict)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.support.serving import Server

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection")


def test_schema_names_the_vocabulary_limits_and_errors(server: Server) -> None:
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    event = schemas["Event"]["properties"]
    assert event["behavior"]["enum"] == ["view", "fav", "cart", "buy", "return"]
    assert event["amount"]["maximum"] > 0 and event["quantity"]["maximum"] > 0
    assert any("pattern" in option for option in event["user_id"]["anyOf"])
    predict = spec["paths"]["/predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"]["additionalProperties"] is False
    assert set(predict["responses"]) == {"200", "400", "401", "413", "415", "422", "500"}
    assert schemas["ErrorBody"]["properties"]["detail"]["type"] == "array"


def test_an_amount_is_refused_on_no_money_behaviour_and_a_return_only_by_a_model_without_returns(
        server: Server) -> None:
    # The gate's rule (schema.MONEY_BEHAVIORS): buy and return carry an amount. The served model has no
    # returns, so a return (with its amount) is refused for its behaviour alone, by the model's vocabulary.
    event = {"user_id": "contract-return", "ts": "1997-05-01T00:00:00Z", "amount": 7.5}
    answer = server.post("/events", {"events": [{**event, "behavior": "buy"}, {**event, "behavior": "return"}]})
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"] == [{"loc": ["events", 1, "behavior"], "msg": "unknown behaviour 'return'; "
                                        "expected one of ['view', 'fav', 'cart', 'buy']"}]
    answer = server.post("/predict", {"events": [{**event, "behavior": "cart"}], "as_of": "1998-01-01"})
    assert answer.status_code == 400
    assert [d["loc"] for d in answer.json()["detail"]] == [["events", 0, "amount"]]
    assert "unless behavior is 'buy' or 'return'" in answer.json()["detail"][0]["msg"]


def test_schemathesis_finds_no_server_error_and_no_contract_violation(server: Server, tmp_path: Path) -> None:
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/docs.json",
               "--checks", ",".join(CHECKS), "--mode", "all", "--max-examples", "40", "--seed", "19",
               "--workers", "1", "--generation-database", "none", "--report", "har",
               "--report-har-path", str(tmp_path / "run.har"), "--request-timeout", "60"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    entries = json.loads((tmp_path / "run.har").read_text())["log"]["entries"]
    answered = Counter((e["request"]["url"].removeprefix(server.url), e["response"]["status"]) for e in entries)
    assert not [key for key in answered if key[1] >= 500], answered
    assert answered[("/predict", 200)] > 0, answered  # schema-valid requests reach scoring
    assert answered[("/predict", 400)] > 0, answered  # and schema-invalid ones are refused
    assert "Traceback" not in server.output_path.read_text()  # every 4xx logged as one line
