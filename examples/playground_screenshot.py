"""The README's screenshot of the playground: `gptlab serve runs/demo --runs runs` (after `make demo`), a sample of
"ROMEO:" with one token hovered, taken in headless Chromium (Debian's package) through Playwright.

    python examples/playground_screenshot.py [--model runs/demo] [--out docs/playground.png]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

from playwright.sync_api import sync_playwright


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/demo")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--out", default="docs/playground.png")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "gptlab", "serve", args.model, "--runs", args.runs, "--port", "0"]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stderr:  # type: ignore[union-attr]
            m = re.search(r"at (http://\S+)/v1", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise SystemExit("gptlab serve did not start")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 560})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('context')")
            page.fill("#prompt", "ROMEO:")
            for field, value in {"temperature": "0.8", "seed": "7", "max_tokens": "56", "top_k": "0"}.items():
                page.fill(f"#{field}", value)
            page.click("#generate")
            page.wait_for_selector("#outputs .finish")
            page.query_selector_all("#outputs .tok")[12].hover()
            page.wait_for_selector("#tip tr.alt")
            page.screenshot(path=args.out)
            browser.close()
    finally:
        server.terminate()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
