"""The HTML report: exact overlays, a real browser (console, cards, sorting, filtering, screenshot), size."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from netdissection.core.results import load_run
from netdissection.core.scores import count_detectors, unit_scores
from netdissection.core.types import DETECTOR_IOU
from netdissection.plugins.reports.html_report import FILES, PAGE, HtmlReport
from netdissection.plugins.reports.overlay import DIM_LEVEL, OUTLINE_RGB, unit_overlay
from netdissection.plugins.reports.strips import GAP, ImageSource, unit_overlays

from .browser import chromium, console_errors
from .report_data import SmallRun, generated_set, synthetic_run

AMBIGUOUS = 1e-9  # pixels this close to the threshold may round either way; they are left out of exact checks


# ------------------------------------------------------------------------------------------ the overlays


def reference_upsample(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling written independently: half-pixel centres, edges clamped, via ``numpy.interp``
    (which clamps outside the sample range), rows then columns."""
    h, w = raw.shape

    def centres(n_in: int, n_out: int) -> np.ndarray:
        return (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5

    across = np.stack([np.interp(centres(w, size[1]), np.arange(w), row) for row in raw.astype(np.float64)])
    return np.stack([np.interp(centres(h, size[0]), np.arange(h), column) for column in across.T], axis=1)


def check_overlay(overlay: np.ndarray, image: np.ndarray, raw: np.ndarray, threshold: float) -> tuple[int, int]:
    """Assert the overlay pixel by pixel against an independently computed mask; return (on, off) counts."""
    values = reference_upsample(raw, image.shape[:2])
    torch_values = torch.nn.functional.interpolate(torch.from_numpy(raw.astype(np.float64))[None, None],
                                                   size=image.shape[:2], mode="bilinear",
                                                   align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(values, torch_values, rtol=0, atol=1e-12)
    on, off = values > threshold + AMBIGUOUS, values <= threshold - AMBIGUOUS
    assert (on | off).mean() > 0.999  # hardly any pixel sits on the threshold
    dimmed = ((image.astype(np.uint16) * DIM_LEVEL) >> 8).astype(np.uint8)
    # Outside the mask: exactly the dimmed image, every pixel.
    np.testing.assert_array_equal(overlay[off], dimmed[off])
    # Inside: the edge (mask pixels with a 4-neighbour outside) in the outline colour, the rest untouched.
    padded = np.pad(off, 1, constant_values=False)
    near_off = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    edge = on & near_off
    interior = on & ~near_off
    near_ambiguous = ~(on | off)
    np.testing.assert_array_equal(overlay[edge], np.broadcast_to(OUTLINE_RGB, (int(edge.sum()), 3)))
    settled = interior & ~np.pad(near_ambiguous, 1)[1:-1, 1:-1]
    np.testing.assert_array_equal(overlay[settled], image[settled])
    return int(on.sum()), int(off.sum())


def test_overlay_of_a_known_map() -> None:
    """A 2×2 map with one hot corner on an 8×8 grey image: mask, dimming and outline worked out by hand."""
    raw = np.array([[4.0, 0.0], [0.0, 0.0]])
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    overlay = unit_overlay(image, raw, threshold=2.0)
    # Output pixel i sits at source coordinate (i + 0.5)/4 - 0.5 = -0.375, -0.125, 0.125, 0.375, ... (clamped
    # to 0 below 0): the value is 4·(1 - y)(1 - x) for y, x in (0, 0, .125, .375, .625, ...), so > 2 on rows
    # 0-2 × columns 0-3 (4·.875·.625 = 2.19) and on row 3 × columns 0-2, but not at (3, 3) (4·.625² = 1.56).
    mask = np.zeros((8, 8), dtype=bool)
    mask[:3, :4] = True
    mask[3, :3] = True
    np.testing.assert_array_equal(reference_upsample(raw, (8, 8)) > 2.0, mask)
    expected = np.full((8, 8, 3), (200 * DIM_LEVEL) >> 8, dtype=np.uint8)
    expected[:3, :3] = 200  # inside; the image border is no edge
    expected[:3, 3] = OUTLINE_RGB  # the mask's edge pixels, next to pixels outside it
    expected[3, :3] = OUTLINE_RGB
    np.testing.assert_array_equal(overlay, expected)


def test_overlays_of_a_real_run_are_exact(small_run: SmallRun) -> None:
    """The very overlays the report writes (before scaling and JPEG), for every top image of 24 units."""
    layer = small_run.result.layers["layer2"]
    assert layer.top_images is not None
    images = ImageSource(small_run.result.dataset)
    rows = unit_scores(layer)
    units = [r.unit - 1 for r in rows[:12]] + [r.unit - 1 for r in rows[-12:]]  # the best and the worst
    on = off = 0
    for unit in units:
        overlays, tiles = unit_overlays(layer, unit, images, tile=112, top_k=None)
        assert len(overlays) == min(10, len(small_run.result.dataset))
        for slot, (overlay, (index, peak)) in enumerate(zip(overlays, tiles, strict=True)):
            assert index == layer.top_images.indices[unit, slot]
            assert peak == pytest.approx(layer.top_images.scores[unit, slot])
            image = images(index)
            counted = check_overlay(overlay, image, layer.top_images.maps[unit, slot], float(layer.thresholds[unit]))
            on, off = on + counted[0], off + counted[1]
    assert on > 1000 and off > 1000  # not vacuous: masks both fire and do not


def test_written_jpeg_strips_match_the_overlays(small_run: SmallRun) -> None:
    """The JPEG strip the run wrote shows the overlays, roughly (lossy): tile by tile, small mean error."""
    layer = small_run.result.layers["layer2"]
    images = ImageSource(small_run.result.dataset)
    best = unit_scores(layer)[0].unit - 1
    overlays, _ = unit_overlays(layer, best, images, tile=112, top_k=None)
    strip = np.asarray(Image.open(small_run.out / FILES / "layer2" / f"unit{best + 1:04d}.jpg").convert("RGB"))
    side = overlays[0].shape[0]  # 64 px images stay 64 px: tiles never enlarge every image
    assert strip.shape == (side, len(overlays) * side + (len(overlays) - 1) * GAP, 3)
    for i, overlay in enumerate(overlays):
        tile = strip[:, i * (side + GAP): i * (side + GAP) + side].astype(np.float64)
        assert np.abs(tile - overlay).mean() < 6.0
        # And the JPEG kept the dimming: far from the mask the tile is as dark as the dimmed image.
    dimmed = ((images(int(layer.top_images.indices[best, 0])).astype(np.uint16) * DIM_LEVEL) >> 8)
    assert strip[:, :side].mean() < dimmed.mean() * 1.6 + 20


# ----------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def cards(driver: Any, grid: str) -> list[dict[str, Any]]:
    """Cards of a grid in page order, with what the page shows of each."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' > .card')).map(c => ({"
        "unit: +c.dataset.unit, iou: +c.dataset.iou, label: c.dataset.label, cat: c.dataset.cat,"
        "hidden: c.hidden, visible: c.offsetParent !== null, det: c.classList.contains('det'),"
        "opacity: +getComputedStyle(c).opacity}))", f"#{grid}")


def click(driver: Any, selector: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, selector).click()


def test_page_in_chromium(small_run: SmallRun, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = small_run.out / PAGE
    browser.get(page.as_uri())
    assert console_errors(browser) == []

    result = small_run.result
    for name, layer in result.layers.items():
        rows = unit_scores(layer)
        counts = count_detectors(rows, layer.vocabulary.categories)
        shown = cards(browser, f"grid-{name}")
        assert len(shown) == layer.units
        headline = browser.find_element(By.CSS_SELECTOR, f"#layer-{name} .headline").text
        assert headline == (f"{counts.detectors}/{layer.units} units are detectors covering "
                            f"{counts.unique_labels} concepts (IoU ≥ 0.04)")
        # The default order: by IoU, best first; detectors opaque, the rest greyed.
        assert [c["unit"] for c in shown] == [c["unit"] for c in sorted(shown, key=lambda c: (-c["iou"], c["unit"]))]
        assert {c["unit"] for c in shown if c["det"]} == {r.unit for r in rows if r.score >= DETECTOR_IOU}
        assert all(c["opacity"] == 1 for c in shown if c["det"])
        assert all(c["opacity"] < 1 for c in shown if not c["det"])

    # The first strip is in view: it loads (lazy loading still loads what is on screen).
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "const i = document.querySelector('#grid-layer2 img.strip'); return i.complete && i.naturalWidth > 0"))
    screenshot = tmp_path / "report.png"
    assert browser.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] >= 1000
    print(f"screenshot: {screenshot}")

    # The plots the run wrote are on the page, folded; opened, they load.
    assert len(browser.find_elements(By.CSS_SELECTOR, "details.plots")) == 3  # across layers, and per layer
    click(browser, "#layer-layer2 details.plots summary")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "const s = Array.from(document.querySelectorAll('#layer-layer2 details.plots img'));"
        "return s.length === 3 && s.every(i => i.complete && i.naturalWidth > 0)"))

    grid = "grid-layer3"
    key = {"unit": lambda c: c["unit"], "label": lambda c: (c["label"], -c["iou"], c["unit"]),
           "category": lambda c: (c["cat"], -c["iou"], c["unit"])}
    click(browser, "button[data-sort=unit]")
    assert [c["unit"] for c in cards(browser, grid)] == list(range(1, 257))
    click(browser, "button[data-sort=unit]")  # again: the other way
    assert [c["unit"] for c in cards(browser, grid)] == list(range(256, 0, -1))
    for sort in ("label", "category"):
        click(browser, f"button[data-sort={sort}]")
        now = cards(browser, grid)
        assert now == sorted(now, key=key[sort]), sort
    click(browser, "button[data-sort=iou]")
    now = cards(browser, grid)
    assert [c["iou"] for c in now] == sorted((c["iou"] for c in now), reverse=True)
    click(browser, "button[data-sort=iou]")  # worst first; ties still by unit number
    ascending = sorted(now, key=lambda c: (c["iou"], c["unit"]))
    assert [c["unit"] for c in cards(browser, grid)] == [c["unit"] for c in ascending]

    rows = unit_scores(result.layers["layer3"])
    click(browser, "button[data-filter=color]")
    visible = [c for c in cards(browser, grid) if c["visible"]]
    assert {c["unit"] for c in visible} == {r.unit for r in rows if r.category == "color"}
    assert all(c["hidden"] == (c["cat"] != "color") for c in cards(browser, grid))
    click(browser, "#detectors-only")
    visible = [c for c in cards(browser, grid) if c["visible"]]
    assert {c["unit"] for c in visible} == {r.unit for r in rows if r.category == "color" and r.score >= DETECTOR_IOU}
    shown_text = browser.find_element(By.ID, f"{grid}-shown").text
    assert shown_text == f"{len(visible)} of 256 units shown"
    click(browser, "button[data-filter='']")
    visible = [c for c in cards(browser, grid) if c["visible"]]
    assert len(visible) == count_detectors(rows, result.layers["layer3"].vocabulary.categories).detectors
    click(browser, "#detectors-only")
    assert all(c["visible"] for c in cards(browser, grid))
    assert console_errors(browser) == []


def test_page_without_the_dataset(small_run: SmallRun, tmp_path: Path, browser: Any,
                                  caplog: pytest.LogCaptureFixture) -> None:
    """Rebuilt from disk with the dataset gone: the page is written without strips and says why."""
    out = tmp_path / "out"
    shutil.copytree(small_run.out, out, ignore=shutil.ignore_patterns(FILES, PAGE))
    summary = json.loads((out / "summary.json").read_text())
    summary["provenance"]["dataset"]["path"] = str(tmp_path / "moved-away")
    (out / "summary.json").write_text(json.dumps(summary))
    with caplog.at_level(logging.WARNING):
        written = HtmlReport().write(load_run(out), out)
    assert written == [out / PAGE]
    assert not (out / FILES).exists()
    text = (out / PAGE).read_text()
    assert "No image strips" in text and "moved-away" in text
    assert 'class="strip"' not in text
    assert any("without image strips" in r.getMessage() and "moved-away" in r.getMessage() for r in caplog.records)
    browser.get((out / PAGE).as_uri())
    assert console_errors(browser) == []
    assert len(cards(browser, "grid-layer2")) == 128


def test_a_changed_dataset_is_not_used(small_run: SmallRun, tmp_path: Path) -> None:
    """A dataset folder that now holds another number of images would put wrong pictures under the units."""
    out = tmp_path / "out"
    shutil.copytree(small_run.out, out, ignore=shutil.ignore_patterns(FILES, PAGE))
    other = generated_set(tmp_path / "other", images=5, image_size=32)
    summary = json.loads((out / "summary.json").read_text())
    summary["provenance"]["dataset"]["path"] = str(other)
    (out / "summary.json").write_text(json.dumps(summary))
    HtmlReport().write(load_run(out), out)
    assert "now has 5 images, the run saw 12" in (out / PAGE).read_text()


def test_a_bad_image_costs_only_the_strips(small_run: SmallRun, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """An image corrupted since the run: the page is still written, and says which layers lack strips."""
    out = tmp_path / "out"
    shutil.copytree(small_run.out, out, ignore=shutil.ignore_patterns(FILES, PAGE))
    dataset = shutil.copytree(small_run.dataset, tmp_path / "set")
    (dataset / "images" / "gen" / "000000.jpg").write_bytes(b"not a jpeg")  # every layer's top images use it
    summary = json.loads((out / "summary.json").read_text())
    summary["provenance"]["dataset"]["path"] = str(dataset)
    (out / "summary.json").write_text(json.dumps(summary))
    with caplog.at_level(logging.WARNING):
        written = HtmlReport().write(load_run(out), out)
    assert written == [out / PAGE]
    text = (out / PAGE).read_text()
    assert "No image strips for layer2" in text and "000000.jpg" in text
    assert not (out / FILES).exists()
    assert not list(out.glob(f".{FILES}*"))  # no staging folder left behind


# ------------------------------------------------------------------------------------ a 512-unit layer


@pytest.fixture(scope="module")
def big_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of a synthetic 512-unit layer with 10 images per unit (224 px images, 5,120 overlays)."""
    root = tmp_path_factory.mktemp("big")
    result = synthetic_run(generated_set(root / "set", images=60, image_size=224), units=512, k=10)
    out = root / "out"
    out.mkdir()
    HtmlReport().write(result, out)
    return out


def test_512_units_stay_light(big_report: Path) -> None:
    page = big_report / PAGE
    strips = sorted((big_report / FILES / "layer4").glob("unit*.jpg"))
    assert len(strips) == 512
    total = sum(p.stat().st_size for p in strips)
    print(f"report.html {page.stat().st_size / 1e3:.0f} kB, 512 strips {total / 1e6:.2f} MB")
    assert page.stat().st_size < 1_000_000
    assert total < 15_000_000  # 5,120 thumbnails
    html = page.read_text()
    images = re.findall(r"<img [^>]*>", html)
    assert len(images) == 512
    assert all('loading="lazy"' in tag and "width=" in tag and "height=" in tag for tag in images)
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network
    first = Image.open(strips[0])
    assert first.size == (10 * 112 + 9 * GAP, 112)  # 224 px images shown at half size


def test_512_units_in_chromium(big_report: Path, browser: Any) -> None:
    browser.get((big_report / PAGE).as_uri())
    assert len(cards(browser, "grid-layer4")) == 512
    click(browser, "button[data-sort=unit]")
    assert [c["unit"] for c in cards(browser, "grid-layer4")] == list(range(1, 513))
    # Lazy loading: far below the fold, strips are not fetched before they are scrolled to.
    loaded = browser.execute_script("return Array.from(document.images).filter(i => i.complete && "
                                    "i.naturalWidth > 0).length")
    assert loaded < 512
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    assert console_errors(browser) == []
