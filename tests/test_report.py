"""The ethics-review report and the federated audit, end to end on a simulated
3-hospital DP run through Flower's simulation engine.

The HTML is rendered by a real headless Chromium (Debian's `chromium`, installed by
.ci/run) through Playwright; the PDF by WeasyPrint and read back with pypdf.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedsynth.audit.federated import (
    DCR_BIN_EDGES, ROC_FPR_GRID, SHARE_FILE, ShareError, WIRE_SCHEMA, combine_shares, load_share, validate_share,
)
from fedsynth.audit.report import CHECK_TITLES
from fedsynth.cli import app
from fedsynth.runs.rundir import RunDir
from fedsynth.data.sliceset import SYNTHETIC, TRAIN, SliceSet

from .conftest import make_slices

pytestmark = pytest.mark.slow
runner = CliRunner()
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
SECTIONS = ("Executive summary", "Scope and data", "Model and training", "Formal privacy guarantee",
            "Empirical privacy", "Fidelity", "Utility", "Limitations and residual risk")
FAST = ["--no-utility", "--encoder-steps", "60", "--classifier-steps", "60", "--n-synthetic", "200"]


@pytest.fixture(scope="module")
def federated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-hospital run with DP-SGD everywhere, and its federated audit."""
    root = tmp_path_factory.mktemp("report")
    data = make_slices(n_patients=48).save(root / "slices.npz")
    run = root / "run"
    result = runner.invoke(app, [
        "simulate", "--data", str(data), "--hospitals", "3", "--partition", "iid", "--rounds", "2",
        "--local-steps", "2", "--out", str(run), "--set", "train.batch-size=16", "--set", "model.width=8",
        "--set", "output.grid-per-class=2", "--set", "dp.noise-multiplier=1.0"])
    assert result.exit_code == 0, result.output
    out = root / "audit"
    result = runner.invoke(app, ["audit", "--run", str(run), "--federated", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    return run, out


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


def _render(html: Path, screenshot: Path) -> dict:
    """Open the report in headless Chromium, offline, and read what a viewer would see."""
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 1400})
        page.on("request", lambda r: requests.append(r.url))
        page.goto(html.as_uri())
        page.wait_for_load_state("load")
        seen = page.evaluate("""() => ({
            images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth,
                                                     src: i.src.slice(0, 22)})),
            summary: [...document.querySelectorAll('table.summary tbody tr')].map(r => r.innerText),
            lights: [...document.querySelectorAll('table.summary td.light')].map(
                td => [td.innerText.toLowerCase(), getComputedStyle(td).backgroundColor]),
            headings: [...document.querySelectorAll('h2')].map(h => h.innerText),
            external: [...document.querySelectorAll('link[href], script[src]')].length,
        })""")
        page.screenshot(path=str(screenshot), full_page=False)
        browser.close()
    seen["requests"] = [r for r in requests if not r.startswith(("file:", "data:"))]
    return seen


def test_local_and_consortium_reports_render_in_chromium(federated: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = federated
    for html in [out / "hospitals" / "hospital-a" / "report.html", out / "consortium" / "report.html"]:
        seen = _render(html, tmp_path / "shot.png")
        assert [h.split(". ", 1)[1] for h in seen["headings"]] == list(SECTIONS), html
        assert len(seen["summary"]) == 5 and all(CHECK_TITLES[c] in " ".join(seen["summary"]) for c in CHECK_TITLES)
        colours = {"green": "rgb(46, 125, 50)", "amber": "rgb(249, 168, 37)", "red": "rgb(198, 40, 40)"}
        assert seen["lights"] and all(colours[v] == bg for v, bg in seen["lights"]), seen["lights"]
        assert seen["images"] and all(i["ok"] and i["src"].startswith("data:image/png") for i in seen["images"])
        assert seen["external"] == 0 and seen["requests"] == [], "the report must need nothing outside the file"
        shot = (tmp_path / "shot.png").read_bytes()
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000


def test_pdf_has_every_section_in_order(federated: tuple[Path, Path]) -> None:
    from pypdf import PdfReader

    _, out = federated
    for pdf in [out / "hospitals" / "hospital-b" / "report.pdf", out / "consortium" / "report.pdf"]:
        reader = PdfReader(pdf)
        text = " ".join(page.extract_text() for page in reader.pages)
        positions = [text.find(f"{i}. {name}") for i, name in enumerate(SECTIONS, start=1)]
        assert -1 not in positions and positions == sorted(positions), (pdf, positions)
        assert len(reader.pages) >= 3 and "page 1 of" in text


def test_consortium_report_is_built_from_statistics_only(federated: tuple[Path, Path]) -> None:
    _, out = federated
    shares = [json.loads((out / "hospitals" / h / SHARE_FILE).read_text()) for h in HOSPITALS]
    for share in shares:
        assert set(share) == set(WIRE_SCHEMA)
        for path, value in _leaves(share):
            if isinstance(value, list):  # only flat lists of numbers (histograms, ROC) or names
                assert all(not isinstance(v, list | dict) for v in value), path
                assert len(value) <= max(len(DCR_BIN_EDGES), len(ROC_FPR_GRID), 64), path
    # the consortium report shows no image of any hospital: only its own three plots
    html = (out / "consortium" / "report.html").read_text()
    assert len(re.findall(r"<img ", html)) == 3
    consortium = json.loads((out / "consortium" / "consortium.json").read_text())
    assert set(consortium["figures"]) == {"epsilon_rounds", "dcr_pooled", "mia_roc"}
    local_figures = {(out / "hospitals" / h / "figures" / f).read_bytes() for h in HOSPITALS
                     for f in ("closest_pairs.png", "synthetic_random.png", "real_random.png")}
    consortium_figures = list((out / "consortium" / "figures").iterdir())
    assert len(consortium_figures) == 3 and not any(f.read_bytes() in local_figures for f in consortium_figures)


def test_consortium_figures_match_the_hospital_reports(federated: tuple[Path, Path]) -> None:
    _, out = federated
    consortium = json.loads((out / "consortium" / "consortium.json").read_text())
    html = (out / "consortium" / "report.html").read_text()
    near_total = 0
    for h in HOSPITALS:
        local = json.loads((out / "hospitals" / h / "audit.json").read_text())
        sent = consortium["by_hospital"][h]
        assert sent["summary"] == local["summary"]
        for check, body in local["checks"].items():
            assert [r["value"] for r in sent["checks"][check]["figures"]] == [r["value"] for r in body["figures"]]
        for name, attack in local["membership_inference"]["attacks"].items():
            assert sent["membership"][name]["auc"] == attack["auc"]
            assert f"AUC {attack['auc']:.2f}" in html
        assert sum(sent["dcr_histograms"]["pixels"]["synthetic_to_train"]) == local["inputs"]["synthetic_images"]
        assert sum(sent["dcr_histograms"]["pixels"]["holdout_to_train"]) == local["inputs"]["holdout_images"]
        near_total += local["memorization"]["pixels"]["near_copies"]["count"]
        # the worst hospital decides each consortium light
    for check, verdict in consortium["summary"].items():
        lights = [json.loads((out / "hospitals" / h / "audit.json").read_text())["summary"][check] for h in HOSPITALS]
        assert verdict == max(lights, key=["green", "amber", "red"].index)
    assert consortium["pooled_near_copies"]["pixels"]["count"] == near_total
    pooled = np.sum([consortium["by_hospital"][h]["dcr_histograms"]["encoder"]["holdout_to_train"]
                     for h in HOSPITALS], axis=0)
    assert consortium["pooled_dcr_histograms"]["encoder"]["holdout_to_train"] == pooled.tolist()


def test_the_coordinator_refuses_a_share_that_carries_more_than_statistics(federated: tuple[Path, Path],
                                                                            tmp_path: Path) -> None:
    _, out = federated
    good = load_share(out / "hospitals" / "hospital-a" / SHARE_FILE)
    with_images = dict(good, images=[[0, 1], [2, 3]])
    with pytest.raises(ShareError, match="images is not part of the audit share"):
        validate_share(with_images)
    smuggled = json.loads(json.dumps(good))
    smuggled["dcr_histograms"]["pixels"]["synthetic_to_train"] = [[0] * 32] * len(DCR_BIN_EDGES)
    with pytest.raises(ShareError, match="dcr_histograms/pixels/synthetic_to_train"):
        combine_shares([smuggled])
    with pytest.raises(ShareError, match="same hospital"):
        combine_shares([good, good])
    no_counts = dict(good, counts={})
    with pytest.raises(ShareError, match="counts lacks train_images"):
        validate_share(no_counts)
    # a share from before the copy detector: named as old, not as a missing key
    old = {k: v for k, v in good.items() if k != "copy_detector"} | {"format": "fedsynth-audit-share/1"}
    with pytest.raises(ShareError, match="format 'fedsynth-audit-share/1', expected 'fedsynth-audit-share/2'"):
        validate_share(old)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(with_images))
    result = runner.invoke(app, ["consortium", str(bad), "--out", str(tmp_path / "c"), "--no-pdf"])
    assert result.exit_code == 1 and "bad.json" in result.output and "images" in result.output
    assert not (tmp_path / "c" / "report.html").exists()
    # the same shares, combined by the coordinator's own command, give the same verdicts
    shares = [str(out / "hospitals" / h / SHARE_FILE) for h in HOSPITALS]
    result = runner.invoke(app, ["consortium", *shares, "--out", str(tmp_path / "c2"), "--no-pdf"])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "c2" / "consortium.json").read_text())
    assert again["summary"] == json.loads((out / "consortium" / "consortium.json").read_text())["summary"]


def test_dp_epsilon_table_matches_the_ledger(federated: tuple[Path, Path]) -> None:
    run, out = federated
    ledger = RunDir(run).read_privacy()
    html = (out / "consortium" / "report.html").read_text()
    section = html[html.index("4. Formal privacy guarantee"):html.index("5. Empirical privacy")]
    for h in HOSPITALS:
        last = max((r for r in ledger if r["hospital"] == h), key=lambda r: r["round"])
        row = re.search(rf"<tr><td>{h}</td>(.*?)</tr>", section).group(1)
        cells = re.findall(r'<td class="num">(.*?)</td>', row)
        assert float(cells[6].replace(",", "")) == pytest.approx(last["epsilon_rdp"], rel=5e-4)  # 4 digits shown
        assert float(cells[2]) == last["noise_multiplier"] and cells[4] == f"{last['steps']:,}"
        local = (out / "hospitals" / h / "report.html").read_text()
        local = local[local.index("4. Formal privacy guarantee"):local.index("5. Empirical privacy")]
        assert re.search(rf"<tr><td>{h}</td>(.*?)</tr>", local).group(1) == row, "local and consortium tables agree"


def test_a_copying_generator_is_red_in_the_report(federated: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = federated
    own = SliceSet.load(run / "hospitals" / "hospital-a" / "slices.npz")
    train = own.only(TRAIN)
    copies = SliceSet(images=train.images, labels=train.labels, class_names=train.class_names,
                      patient_ids=train.patient_ids, split=np.full(len(train), SYNTHETIC),
                      source=train.source, meta={"conditional": True})
    syn = copies.save(tmp_path / "copies.npz")
    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", "--run", str(run), "--hospital", "hospital-a", "--synthetic", str(syn),
                                 "--out", str(out), "--no-utility", "--encoder-steps", "60",
                                 "--classifier-steps", "60"])
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    summary = html[html.index('<table class="summary">'):html.index("</table>", html.index('class="summary"'))]
    copying_row = summary[summary.index(CHECK_TITLES["copying"]):].split("</tr>")[0]
    assert 'class="light red"' in copying_row and "do not release" in copying_row
    share = load_share(out / SHARE_FILE)
    assert share["hospital"] == "hospital-a" and share["summary"]["copying"] == "red"


def _leaves(value: object, path: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}/{k}")]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, value)]
