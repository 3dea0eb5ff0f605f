"""The head atlas in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) opens the file with networking disabled; no console errors, the heatmap
renders, hovering and clicking a cell show that head's numbers equal to ``results.parquet``, the
search finds a head, text from the runs does not run as script, and a screenshot is saved (under
``$HEADLAB_TEST_ARTEFACTS`` when set)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from tiny_folder import make_model_folder

from headlab.atlas.browser import headless_chromium, missing
from headlab.cli.app import main

#: a prompt that would set a flag if any text from the runs reached the page as markup
PROMPT = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script> The cat'

if (why := missing()) is not None:
    pytest.skip(f"the browser tests cannot run: {why}", allow_module_level=True)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("browser")
    folder = str(make_model_folder(root / "tiny"))
    sweep, prompt = root / "sweep", root / "prompt"
    argv = ["sweep", "--model", folder, "--data", "python-docs", "--seq-len", "16", "--n-blocks",
            "3", "--n-stats-blocks", "4", "--batch-size", "2", "--method", "zero,mean", "--bins",
            "50", "--quiet", "--out", str(sweep)]  # fmt: skip
    assert main(argv) == 0
    argv = ["attention", "--model", folder, "--prompt", PROMPT, "--quiet", "--out", str(prompt)]
    assert main(argv) == 0
    out = root / "atlas.html"
    # the prompt run first: its tokens label the attention patterns of the cards
    assert main(["report", str(prompt), str(sweep), "--out", str(out), "--quiet"]) == 0
    return out, sweep


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium(console_log=True, offline=True)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


def severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def artefact(name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("HEADLAB_TEST_ARTEFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_atlas_works_offline_in_chromium(atlas, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    path, sweep = atlas
    table = pd.read_parquet(sweep / "results.parquet")
    row = table[(table.method == "zero") & (table.metric == "ce")]
    browser.get(path.as_uri())
    wait_for(browser, "return window.atlasReady !== undefined")
    assert severe(browser) == []
    # the heatmap rendered: plotly's svg with a heatmap layer, opened on the sweep
    assert browser.execute_script("return !!document.querySelector('#heatmap .main-svg .hm')")
    # the first method the command listed; its ranking table follows
    title = wait_for(browser, "return document.getElementById('ranking-title').textContent")
    assert title == "sweep · sweep · zero / ce"

    # hover: the label shows the head's Δ from results.parquet (4 significant digits)
    want = row[(row.layer == 2) & (row["head"] == 1)].iloc[0]
    browser.execute_script("Plotly.Fx.hover('heatmap', {xval: 1, yval: 2});")
    label = wait_for(browser, "const e = document.querySelector('#heatmap .hoverlayer');"
                     "return e && e.textContent;")  # fmt: skip
    assert "L2.H1" in label
    shown = float(re.search(r"Δce = ([-+0-9.e]+)", label).group(1))
    assert shown == pytest.approx(want.delta, rel=5e-4)
    assert f"n = {want.n}" in label

    # click a cell (a real mouse event at the cell's centre): its card opens with its numbers
    want = row[(row.layer == 1) & (row["head"] == 3)].iloc[0]
    x, y = browser.execute_script(
        "const gd = document.getElementById('heatmap'), L = gd._fullLayout;"
        "gd.scrollIntoView({block: 'center'});"
        "const r = gd.querySelector('.nsewdrag').getBoundingClientRect();"
        "return [r.left + L.xaxis.d2p(3), r.top + L.yaxis.d2p(1)];"
    )
    mouse = {"x": x, "y": y, "button": "left", "clickCount": 1}
    browser.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", **mouse})
    # plotly clicks what it hovers (its hover is throttled): wait for the hover to reach the cell
    wait_for(browser, "const e = document.querySelector('#heatmap .hoverlayer');"
             "return e && e.textContent.includes('L1.H3');")  # fmt: skip
    for kind in ("mousePressed", "mouseReleased"):
        browser.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": kind, **mouse})
    wait_for(browser, "return document.getElementById('card').classList.contains('open')")
    assert browser.find_element(By.ID, "card-title").text == "L1.H3"
    cells = browser.execute_script(
        "return [...document.querySelectorAll('#card-numbers tr')]"
        ".filter(r => r.cells[0] && r.cells[0].textContent.startsWith('zero / ce'))"
        ".map(r => [...r.cells].map(c => c.textContent));"
    )
    assert len(cells) == 1
    value, interval, n, rank = cells[0][1:]
    assert float(value) == pytest.approx(want.delta, rel=1e-5)
    assert n == str(want.n) and rank.endswith("of 12")
    lo, hi = (float(v) for v in interval.split(" … "))
    assert lo < want.delta < hi
    assert browser.execute_script("return !!document.querySelector('#card-pattern .main-svg')")

    # search finds a head
    box = browser.find_element(By.ID, "search")
    box.clear()
    box.send_keys("L1.H2", Keys.ENTER)
    wait_for(browser, "return document.getElementById('card-title').textContent === 'L1.H2'")
    box.clear()
    box.send_keys("L9.H0", Keys.ENTER)
    assert "no head L9.H0" in browser.find_element(By.ID, "search-msg").text

    # the ranking table sorts and filters
    browser.find_element(By.ID, "filter").send_keys("L2.")
    names = browser.execute_script(
        "return [...document.querySelectorAll('#ranking tbody tr')].map(r => r.dataset.head);"
    )
    assert sorted(names) == ["L2.H0", "L2.H1", "L2.H2", "L2.H3"]

    assert browser.execute_script("return window.__pwned === undefined")
    assert severe(browser) == []
    shot = artefact("atlas.png", tmp_path)
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
