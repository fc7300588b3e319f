"""Render a personavec HTML report in headless Chromium and check it looks like a page.

Installs nothing. Needs Chromium, e.g. on Debian/Ubuntu::

    apt-get update && apt-get install -y chromium

Usage::

    python bench/render_report.py runs/evil-smollm2-135m/report.html [--png shot.png] [--chromium PATH]

Checks (exit code 1 if any fails):

* the screenshot PNG exists and is not blank (pixel variance above a small threshold);
* Chromium's console log (``--enable-logging=stderr --v=0``) has no ``Uncaught`` or ``ERROR:CONSOLE``
  line, i.e. the page raised no errors;
* ``--dump-dom`` of the page still holds the report's section headings.

The browser runs with networking features off and a fresh profile (``--user-data-dir``), so a report
that needed the network would show broken images rather than silently fetch them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
)
SECTIONS = ("Trait", "Filtering", "Per-layer separation", "Dose-response", "Example answers", "Per-token")


def find_chromium(explicit: str | None = None) -> str | None:
    """Path of a Chromium binary (the argument, /usr/bin/chromium, or one on PATH)."""
    if explicit:
        return explicit
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def pixel_variance(png: Path) -> float:
    """Variance of the grey levels of a PNG (0 for a single-colour image)."""
    import matplotlib.image as mpimg
    import numpy as np

    img = np.asarray(mpimg.imread(str(png)), dtype=float)
    grey = img[..., :3].mean(axis=-1) if img.ndim == 3 else img
    return float(grey.var())


def render(html: Path, png: Path, chromium: str, timeout: float = 120.0) -> dict[str, object]:
    """Screenshot and DOM-dump ``html``; return the check results."""
    url = html.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="pv-chromium-") as profile:
        common = [chromium, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
        shot = subprocess.run(
            [*common, f"--screenshot={png}", "--window-size=1280,2400", url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    log = shot.stderr + dom.stderr
    errors = [ln for ln in log.splitlines() if "Uncaught" in ln or "ERROR:CONSOLE" in ln]
    variance = pixel_variance(png) if png.is_file() else 0.0
    missing = [s for s in SECTIONS if s not in dom.stdout]
    return {
        "screenshot": str(png),
        "screenshot_ok": png.is_file() and variance > 1e-4,
        "pixel_variance": variance,
        "console_errors": errors,
        "dom_bytes": len(dom.stdout),
        "missing_sections": missing,
        "ok": png.is_file() and variance > 1e-4 and not errors and not missing and dom.returncode == 0,
    }


def main() -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path)
    ap.add_argument("--png", type=Path, default=None, help="screenshot path (default: beside the HTML)")
    ap.add_argument("--chromium", default=None)
    args = ap.parse_args()
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("chromium not found: apt-get update && apt-get install -y chromium", file=sys.stderr)
        return 2
    png = args.png or args.html.with_name(args.html.stem + "-screenshot.png")
    result = render(args.html, png, chromium)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
