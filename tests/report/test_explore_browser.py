"""explore.html in a real browser: headless Chromium driven by Selenium with Debian's chromedriver."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from attnprobe.report.datatypes import flag_reasons, run_thresholds
from attnprobe.report.writer import write_report
from tests.report.test_explore import HOSTILE, explore_markup, write_kept
from tests.report.test_writer import write_refine_run, write_scan_run

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.browser


def _missing() -> str | None:
    if not (Path(CHROMIUM).is_file() or shutil.which("chromium")):
        return "chromium"
    if not (Path(CHROMEDRIVER).is_file() or shutil.which("chromedriver")):
        return "chromedriver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is missing in CI; .ci/run installs chromium and chromium-driver, and the test "
                        "extra selenium")
        pytest.skip(f"{missing} not installed; CI installs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver) and selenium (pip install -e '.[test]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False,
        "profile.default_content_setting_values.automatic_downloads": 1})
    driver_path = CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else shutil.which("chromedriver")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.downloads = downloads
    yield driver
    driver.quit()


def requests_made(driver) -> list[str]:
    """URLs of the requests the page sent since the last call (the performance log's Network events)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def wait_for(predicate, timeout: float = 10.0):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_network_check_sees_a_request(browser, tmp_path):
    """The check below can fail: a page that loads an image shows up in the log."""
    requests_made(browser)
    control = tmp_path / "control.html"
    control.write_text('<html><body><img src="http://127.0.0.1:9/x.png">control</body></html>')
    browser.get(control.as_uri())
    time.sleep(0.5)
    assert "http://127.0.0.1:9/x.png" in requests_made(browser)


def test_explorer_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    run = write_scan_run(tmp_path / "s", n_layers=3, n_heads=4, seed=4)
    write_kept(run, 3, 4, [["[CLS]", "a", HOSTILE, "b", "[SEP]", "c", "d", "[SEP]"],
                           ["[CLS]", *[f"w{i}" for i in range(7)], "[SEP]"]])
    page = write_report([run], fmt="html").explore
    heads = pd.read_parquet(run / "heads.parquet")
    heads["flagged"] = heads.collapsed | heads.high_gtd | heads.sink | heads.diffuse
    thresholds = run_thresholds(json.loads((run / "run.json").read_text()))
    browser.get_log("browser")
    requests_made(browser)

    find, finds = browser.find_element, browser.find_elements
    browser.get(page.resolve().as_uri() + "#L0H1")
    wait_for(lambda: find(By.TAG_NAME, "body").get_attribute("data-ready"))
    assert find(By.ID, "head-title").text.startswith("Layer 0, head 1")

    # a flagged head from the table: its patterns (one canvas per example) and its reasons
    row = find(By.CSS_SELECTOR, "#heads tbody tr.flagged")
    key = row.get_attribute("data-head")
    row.click()
    layer, head = (int(v) for v in key[1:].split("H"))
    assert browser.current_url.endswith(f"#{key}")
    rec = heads[(heads.layer == layer) & (heads["head"] == head)].iloc[0].to_dict()
    assert find(By.ID, "reasons").text.splitlines() == flag_reasons(rec, thresholds)
    canvases = finds(By.CSS_SELECTOR, "#head canvas.pattern")
    assert len(canvases) == 2
    assert not finds(By.CSS_SELECTOR, "img")  # the hostile token made no element

    # hover a cell: its value; hover a token: what it attends to
    ActionChains(browser).move_to_element_with_offset(canvases[1], 0, 0).perform()
    status = finds(By.CSS_SELECTOR, "#head .status")[1]
    wait_for(lambda: "query" in status.text or "attends to" in status.text)

    # sort by GTD: the rows follow heads.parquet's GTD order, and reverse on a second click
    find(By.CSS_SELECTOR, '#heads th[data-col="gtd"]').click()
    order = [r.get_attribute("data-head") for r in finds(By.CSS_SELECTOR, "#heads tbody tr")]
    expected = heads.sort_values(["gtd", "layer", "head"], kind="stable")
    assert order == [f"L{l}H{h}" for l, h in zip(expected.layer, expected["head"])]
    assert find(By.CSS_SELECTOR, '#heads th[data-col="gtd"]').get_attribute("aria-sort") == "ascending"
    find(By.CSS_SELECTOR, '#heads th[data-col="gtd"]').click()
    assert finds(By.CSS_SELECTOR, "#heads tbody tr")[0].get_attribute("data-head") == order[-1]

    # filter: only the sink heads
    Select(find(By.CSS_SELECTOR, '#heads select[data-filter="sink"]')).select_by_value("yes")
    shown = {r.get_attribute("data-head") for r in finds(By.CSS_SELECTOR, "#heads tbody tr")}
    assert shown == {f"L{l}H{h}" for l, h in zip(heads[heads.sink].layer, heads[heads.sink]["head"])}

    # an address opens its head; keys step through the flagged heads
    browser.execute_script("location.hash = '#L2H3'")
    wait_for(lambda: find(By.ID, "head-title").text.startswith("Layer 2, head 3"))
    find(By.TAG_NAME, "body").send_keys("n")
    title = find(By.ID, "head-title").text
    l2, h2 = (int(v) for v in title.split(" \u2014 ")[0].replace("Layer ", "").split(", head "))
    assert heads[(heads.layer == l2) & (heads["head"] == h2)].flagged.item()
    assert browser.current_url.endswith(f"#L{l2}H{h2}")

    # the sink switch: position 0 hidden, the head's sink mass shown
    find(By.ID, "hide-sink").click()
    rec = heads[(heads.layer == l2) & (heads["head"] == h2)].iloc[0]
    assert f"sink mass is {rec.sink_mass:.4f}" in find(By.ID, "sink-note").text

    # exports: the shown pattern as PNG, the head table as CSV (full precision)
    finds(By.CSS_SELECTOR, "#head button.export-png")[0].click()
    png = wait_for(lambda: [p for p in browser.downloads.glob("*.png") if p.stat().st_size > 0])
    assert png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    find(By.ID, "export-csv").click()
    table = wait_for(lambda: [p for p in browser.downloads.glob("*.csv") if p.stat().st_size > 0])
    rows = list(csv.DictReader(table[0].open()))
    assert {(int(r["layer"]), int(r["head"])) for r in rows} == set(zip(heads[heads.sink].layer, heads[heads.sink]["head"]))
    for r in rows:
        value = heads[(heads.layer == int(r["layer"])) & (heads["head"] == int(r["head"]))].gtd.item()
        assert float(r["gtd"]) == value

    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    leaving = [u for u in requests_made(browser) if u != page.resolve().as_uri() and not u.startswith("data:")]
    assert not leaving, leaving


def test_comparison_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    scan = write_scan_run(tmp_path / "a", n_layers=2, n_heads=4)
    refine = write_refine_run(tmp_path / "b", n_layers=2, n_heads=4, epochs=2)
    write_kept(refine, 2, 4, [["[CLS]", "x", "y", "[SEP]"]], stage="before")
    write_kept(tmp_path / "a", 2, 4, [["[CLS]", "x", "y", "[SEP]"]])
    page = tmp_path / "explore.html"
    page.write_text(explore_markup(scan, refine), encoding="utf-8")
    browser.get_log("browser")
    browser.get(page.resolve().as_uri() + "#L1H2")
    wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    Select(browser.find_element(By.ID, "compare")).select_by_index(1)  # the refine before training
    assert "minus" in browser.find_element(By.ID, "grid-title").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#changes tbody tr")
    assert len(rows) == 8
    diag = pd.read_parquet(refine / "diagnostics.parquet")
    before = diag[diag.epoch == 0].set_index(["layer", "head"])
    heads = pd.read_parquet(scan / "heads.parquet").set_index(["layer", "head"])
    cell = browser.find_element(By.CSS_SELECTOR, '#changes tr[data-head="L1H2"] td:nth-child(3)')
    column = browser.find_element(By.CSS_SELECTOR, "#changes th:nth-child(3)").get_attribute("title")
    assert float(cell.get_attribute("title")) == heads.loc[(1, 2), column] - before.loc[(1, 2), column]
    figures = browser.find_elements(By.CSS_SELECTOR, "#head .pair canvas.pattern")
    assert len(figures) == 2  # the scan's example and the refine's, side by side
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
