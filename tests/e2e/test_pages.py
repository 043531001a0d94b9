"""The Data Docs the validate stage writes render styled in a browser with no internet (the run report and
`dvc plots show` are checked on a real pipeline run in test_dvc_pipeline.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support.browser import coloured_share, dump_dom, missing_local_assets, remote_assets, screenshot
from uservalue.cli.app import app


@pytest.mark.slow  # a real chromium renders the pages
def test_data_docs_render_styled_offline(cdnow_events: Path, tmp_path: Path, write_params) -> None:
    report_dir = tmp_path / "validation"
    result = CliRunner().invoke(app, [
        "validate", "--params", str(write_params()), "--events", str(cdnow_events),
        "--out", str(tmp_path / "validated.parquet"), "--quarantine", str(tmp_path / "quarantine.parquet"),
        "--report-dir", str(report_dir)])
    assert result.exit_code == 0, result.output
    site = report_dir / "data_docs"
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 3  # index, the suite, the validation result
    for page in pages:
        html = page.read_text()
        assert remote_assets(html) == [], page
        assert missing_local_assets(html, page) == [], page
    result_page = next(p for p in pages if "validations" in p.parts)
    assert "Succeeded" in dump_dom(result_page, tmp_path)

    # Styled: the page as written against the same page without its stylesheets, in one run.
    bare = result_page.with_name("unstyled.html")
    bare.write_text(re.sub(r"<link\b[^>]*stylesheet[^>]*>", "", result_page.read_text()))
    styled_share = coloured_share(screenshot(result_page, tmp_path, "data-docs-validation"))
    bare_share = coloured_share(screenshot(bare, tmp_path, "data-docs-unstyled"))
    assert styled_share > 1.5 * bare_share, (styled_share, bare_share)
