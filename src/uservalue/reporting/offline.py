"""Pages that render offline: the JavaScript and CSS that third-party HTML (Great Expectations' Data Docs,
`dvc plots show`) loads from CDNs is copied from installed Python packages instead, and the pages are
rewritten to load it from beside them. Nothing is downloaded; nothing large is committed.

Sources (all PyPI wheels, pinned in requirements/constraints.txt):
- Vega, Vega-Lite and Vega-Embed: `vl-convert-python` (`javascript_bundle()`: one script, ~0.9 MB);
- Bootstrap 4, jQuery and Popper: `bootstrap-flask` (its `static/bootstrap4`);
- Font Awesome 6: `fontawesomefree` (css + webfonts).
Assets with no offline source (bootstrap-table, bootstrap-datepicker, the dark-mode sheet, remote logos)
are dropped: the pages stay complete and styled; their tables are plain (not sortable)."""

from __future__ import annotations

import html
import os
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

VENDOR_DIR = "vendor"  # under a site's root
VEGA_BUNDLE = "vega-bundle.js"


@dataclass(frozen=True)
class Asset:
    """One CDN asset served locally: what it matches (a URL regex) and the local file's name."""

    pattern: str
    local: str


# Matched against each script src / stylesheet href; the first match wins.
ASSETS = (
    Asset(r"^https?://cdn\.jsdelivr\.net/npm/vega@", VEGA_BUNDLE),
    Asset(r"^https?://cdn\.jsdelivr\.net/npm/vega-(lite|embed)@", VEGA_BUNDLE),
    Asset(r"/jquery[-.\d]*(\.min)?\.js$", "jquery.min.js"),
    Asset(r"/popper(\.min)?\.js$", "popper.min.js"),
    Asset(r"/bootstrap/4[^/]*/js/bootstrap(\.min)?\.js$", "bootstrap.min.js"),
    Asset(r"/bootstrap/4[^/]*/css/bootstrap(\.min)?\.css$", "bootstrap.min.css"),
    Asset(r"/font-awesome/[^/]+/css/all(\.min)?\.css$", "fontawesome/css/all.min.css"),
)

_TAG = re.compile(r"<(script|link|img)\b[^>]*>(\s*</script>)?", re.IGNORECASE | re.DOTALL)
_URL_ATTR = re.compile(r"""\b(src|href)\s*=\s*(["'])(https?://[^"']*)\2""", re.IGNORECASE)
_SRI_ATTRS = re.compile(r"""\s(integrity|crossorigin)\s*=\s*(["'])[^"']*\2""", re.IGNORECASE)
REMOTE_ASSET = re.compile(
    r"""<(?:script|img|link|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*["']https?://""", re.IGNORECASE)


@cache
def vega_bundle() -> str:
    """Vega, Vega-Lite and Vega-Embed in one script that sets window.vega, window.vegaLite, window.vegaEmbed."""
    import vl_convert

    return vl_convert.javascript_bundle()


def _package_dir(module: str) -> Path:
    import importlib

    return Path(importlib.import_module(module).__file__).parent  # type: ignore[arg-type]


def write_vendor_assets(target: Path) -> Path:
    """Copy every local asset into `target` (a site's vendor folder); returns it."""
    target.mkdir(parents=True, exist_ok=True)
    bootstrap = _package_dir("flask_bootstrap") / "static" / "bootstrap4"
    for source, name in ((bootstrap / "jquery.min.js", "jquery.min.js"),
                         (bootstrap / "umd" / "popper.min.js", "popper.min.js"),
                         (bootstrap / "js" / "bootstrap.min.js", "bootstrap.min.js"),
                         (bootstrap / "css" / "bootstrap.min.css", "bootstrap.min.css")):
        shutil.copyfile(source, target / name)
    awesome = _package_dir("fontawesomefree") / "static" / "fontawesomefree"
    (target / "fontawesome" / "css").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(awesome / "css" / "all.min.css", target / "fontawesome" / "css" / "all.min.css")
    # all.min.css loads ../webfonts/*; only the woff2 files (every current browser reads them).
    fonts = target / "fontawesome" / "webfonts"
    fonts.mkdir(exist_ok=True)
    for font in (awesome / "webfonts").glob("*.woff2"):
        shutil.copyfile(font, fonts / font.name)
    (target / VEGA_BUNDLE).write_text(vega_bundle(), encoding="utf-8")
    return target


def local_asset(url: str) -> str | None:
    """The local file name serving `url`, or None when there is no offline source for it."""
    for asset in ASSETS:
        if re.search(asset.pattern, url):
            return asset.local
    return None


def rewrite_page(page: str, vendor_href: str) -> str:
    """`page` with every remote script, stylesheet and image either pointed at `vendor_href`/<file> or
    removed (no offline source); links a reader clicks (<a href>) are left as they are."""
    seen: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        tag, kind = match.group(0), match.group(1).lower()
        url_attr = _URL_ATTR.search(tag)
        if url_attr is None:
            return tag  # a local or inline script: kept
        local = local_asset(html.unescape(url_attr.group(3)))
        stylesheet = kind != "link" or "stylesheet" in tag.lower()
        if local is None or kind == "img" or not stylesheet or local in seen:
            # No offline source, a remote image or icon link, or the Vega bundle already loaded (it
            # answers three CDN scripts): dropped.
            return ""
        seen.add(local)
        tag = _SRI_ATTRS.sub("", tag)  # the local file is another build: its hash differs
        return _URL_ATTR.sub(lambda m: f"{m.group(1)}={m.group(2)}{vendor_href}/{local}{m.group(2)}", tag, count=1)

    return _TAG.sub(replace, page)


def make_site_offline(site: Path) -> int:
    """Rewrite every HTML page under `site` to load its assets from `site/vendor`; returns the pages
    rewritten. Raises RuntimeError if a page still loads something remote (a new CDN reference that
    ASSETS does not know: better a failed stage than a page that is blank offline)."""
    pages = sorted(site.rglob("*.html"))
    if not pages:
        return 0
    vendor = write_vendor_assets(site / VENDOR_DIR)
    for page in pages:
        href = Path(os.path.relpath(vendor, page.parent)).as_posix()
        text = rewrite_page(page.read_text(encoding="utf-8"), href)
        remote = REMOTE_ASSET.search(text)
        if remote:
            raise RuntimeError(f"{page}: still loads a remote asset after the offline rewrite: "
                               f"{text[remote.start(): remote.start() + 160]!r}")
        page.write_text(text, encoding="utf-8")
    return len(pages)


def dvc_plots_template() -> str:
    """The page `dvc plots show` fills ({plot_divs}): DVC's own layout with Vega inlined, and no
    {scripts} placeholder, so DVC's CDN script tags are never added."""
    # `</script` inside the bundle would end the inline script early.
    bundle = vega_bundle().replace("</script", "<\\/script")
    return ("<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <meta charset=\"utf-8\">\n"
            "    <title>uservalue plots</title>\n    <script type=\"text/javascript\">\n" + bundle +
            "\n    </script>\n    <style>\n        table { border-spacing: 15px; }\n    </style>\n</head>\n"
            "<body>\n    {plot_divs}\n</body>\n</html>\n")
