"""`mskjax.segment`'s HTML report opened in a real browser (headless Chromium through selenium and
chromedriver): every image loads, the console stays free of errors, every link resolves (linked
local pages are loaded and checked too), and the tables are whole. A report with a deleted
thumbnail and a deleted overlay must fail those checks.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); nothing is downloaded at
run time. Set MSKJAX_REPORT_SCREENSHOTS=DIR to also save screenshots of the report and of one
overlay page there (docs/report_screenshots/ holds the ones README shows)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse
from urllib.request import url2pathname

import pytest

from mskjax import segment

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="headless browser check needs chromium and chromedriver on PATH "
                                       "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)")


def _pipeline_helpers():
    """test_pipeline.py's checkpoint and data builders (tests/ is not a package: load by path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_mskjax_test_pipeline", Path(__file__).with_name("test_pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A small segment run on the synthetic world (labels, masks, one unreadable file): its folder."""
    helpers = _pipeline_helpers()
    root = tmp_path_factory.mktemp("report")
    cls_dir, sam_dir = helpers.make_checkpoints(root / "ckpt", "resize", seed=5)
    data = helpers.make_synthetic(root / "syn")
    victim = sorted((data / "test").rglob("*.png"))[-1]
    victim.write_bytes(victim.read_bytes()[:200])  # unreadable: the report lists it in its own table
    out = root / "out"
    rc = segment.main(["--classifier", str(cls_dir), "--sam", str(sam_dir), "--dataset", f"synthetic:{data}",
                       "--out", str(out), "--threshold", "0.0", "--batch", "8", "--bootstrap", "20", "--no-progress"])
    assert rc == 0 and (out / "index.html").is_file()
    return out


def make_driver(width: int = 1280, height: int = 1000):
    """Headless Chromium with the browser console log readable through get_log("browser")."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium never looks for (or downloads) one itself.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def driver():
    d = make_driver()
    yield d
    d.quit()


def _load(driver, url: str) -> None:
    driver.get(url)  # returns once the load event fired: every image has loaded or failed


def _image_problems(driver) -> list[str]:
    """One line per <img> on the current page that has not loaded (incomplete or natural width 0)."""
    images = driver.execute_script(
        "return Array.from(document.images, i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight])")
    return [f"image not loaded: {src} (complete={c}, naturalWidth={w})"
            for src, c, w, h in images if not (c and w > 0 and h > 0)]


def _console_problems(driver) -> list[str]:
    """The browser console's SEVERE entries since the last call (get_log empties the buffer)."""
    return [f"console {e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _table_problems(driver) -> list[str]:
    """Tables whose rows do not all have as many cells as their header row."""
    shapes = driver.execute_script(
        "return Array.from(document.querySelectorAll('table'), t => Array.from(t.rows, r => r.cells.length))")
    return [f"table {i}: row cell counts {rows}" for i, rows in enumerate(shapes)
            if not rows or any(n != rows[0] for n in rows)]


def _caption_problems(driver) -> list[str]:
    """Card captions (the image's path) whose end, the file name, is clipped out of view: a long
    path must lose its start, not the part that tells the images apart."""
    clipped = driver.execute_script("""
        return Array.from(document.querySelectorAll('.card div[title]'), d => {
            const walker = document.createTreeWalker(d, NodeFilter.SHOW_TEXT);
            let last = null;
            while (walker.nextNode()) if (walker.currentNode.data.length) last = walker.currentNode;
            if (!last) return null;
            const r = document.createRange();
            r.setStart(last, last.data.length - 1);
            r.setEnd(last, last.data.length);
            const c = r.getBoundingClientRect(), b = d.getBoundingClientRect();
            return (c.left >= b.left - 1 && c.right <= b.right + 1) ? null : d.title;
        }).filter(t => t !== null)""")
    return [f"caption's end not visible: {t}" for t in clipped]


def _file_path(url: str) -> Path | None:
    u = urlparse(url)
    return Path(url2pathname(u.path)) if u.scheme == "file" else None  # url2pathname unquotes


def check_report(driver, index: Path) -> tuple[list[str], dict]:
    """Opens `index` and every local page it links to; returns (problems, stats)."""
    problems: list[str] = []
    _console_problems(driver)  # drop what earlier pages logged
    _load(driver, index.resolve().as_uri())
    problems += (_image_problems(driver) + _console_problems(driver) + _table_problems(driver)
                 + _caption_problems(driver))
    links = driver.execute_script(
        "return Array.from(document.querySelectorAll('a[href]'), a => [a.getAttribute('href'), a.href])")
    ids = set(driver.execute_script("return Array.from(document.querySelectorAll('[id]'), e => e.id)"))
    stats = {"images": len(driver.execute_script("return document.images")), "links": len(links),
             "tables": len(driver.execute_script("return document.querySelectorAll('table')")), "pages": 0}
    pages = []
    for raw, absolute in links:
        target, frag = urldefrag(absolute)
        if raw.startswith("#"):
            if frag and unquote(frag) not in ids:
                problems.append(f"link {raw!r}: no element with id {unquote(frag)!r}")
            continue
        path = _file_path(target)
        if path is None:
            problems.append(f"link {raw!r} leaves the report ({absolute}); it must work offline")
        elif not path.is_file():
            problems.append(f"link {raw!r}: {path} does not exist")
        elif path not in pages:
            pages.append(path)
    for path in pages:  # each linked page loads, with its images (an overlay PNG is one image)
        _load(driver, path.as_uri())
        found = _image_problems(driver) + _console_problems(driver)
        problems += [f"{path.name}: {p}" for p in found]
        stats["pages"] += 1
    return problems, stats


def test_report_renders_in_chromium(report, driver):
    problems, stats = check_report(driver, report / "index.html")
    assert problems == []
    n_overlays = len(list((report / "overlays").glob("*.png")))
    assert n_overlays > 0 and stats["images"] >= n_overlays and stats["pages"] >= n_overlays
    assert stats["links"] >= n_overlays and stats["tables"] >= 4  # run, classification, localisation, segmentation, ...
    _load(driver, (report / "index.html").as_uri())
    text = driver.find_element("tag name", "body").text
    assert "Classification" in text and "Unreadable or skipped inputs (1)" in text
    shots = os.environ.get("MSKJAX_REPORT_SCREENSHOTS")
    if shots:
        save_screenshots(driver, report, Path(shots))


def test_broken_report_fails_the_checks(report, driver, tmp_path):
    """The checks can fail: a deleted thumbnail breaks an image (and logs a console error), a deleted
    overlay breaks a link."""
    broken = shutil.copytree(report, tmp_path / "broken")
    thumb = sorted((broken / "thumbs").glob("*.png"))[0]
    overlay = sorted((broken / "overlays").glob("*.png"))[-1]
    thumb.unlink()
    overlay.unlink()
    problems, _ = check_report(driver, broken / "index.html")
    assert any(p.startswith("image not loaded: thumbs/" + thumb.name) for p in problems), problems
    assert any(p.startswith("console SEVERE") and thumb.name in p for p in problems), problems
    assert any(f"{overlay} does not exist" in p for p in problems), problems
    assert len(problems) == 3, problems


def _set_viewport(driver, width: int, height: int) -> None:
    """Resizes the window so that the page's viewport (not the window) is width x height."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])


def save_screenshots(driver, out: Path, dest: Path, overlay: str | None = None, max_height: int = 2600) -> list[Path]:
    """Screenshots of the report page (its top `max_height` pixels at 1280 wide) and of one overlay
    page (`overlay`, a path relative to `out`; default: the first card's) into `dest`."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    index = (out / "index.html").resolve().as_uri()
    _set_viewport(driver, 1280, 800)
    _load(driver, index)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    _set_viewport(driver, 1280, min(height, max_height))
    _load(driver, index)
    saved = [dest / "report.png", dest / "overlay.png"]
    driver.save_screenshot(str(saved[0]))
    if overlay is None:
        overlay = driver.execute_script("return document.querySelector('.card a').getAttribute('href')")
    w, h = Image.open(out / overlay).size
    _set_viewport(driver, w, h)  # the image at its own size, no scaling
    _load(driver, (out / overlay).resolve().as_uri())
    driver.save_screenshot(str(saved[1]))
    for p in saved:  # smaller files for the repository
        Image.open(p).convert("RGB").save(p, optimize=True)
    _set_viewport(driver, 1280, 1000)
    return saved
