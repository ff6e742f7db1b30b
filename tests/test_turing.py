"""Visual Turing test kit: a blinded sheet nobody can read the answer from, a key kept
apart from it, and the expert's answers scored against chance (`fedsynth turing-test`)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pypdf import PdfReader
from typer.testing import CliRunner

from fedsynth.audit.turing import TuringError, make_test, score
from fedsynth.cli import app
from fedsynth.core.checkpoint import save_checkpoint
from fedsynth.runs.config import RunConfig
from fedsynth.models import build_gan
from fedsynth.runs.rundir import RunDir
from fedsynth.data.sliceset import HOLDOUT, SYNTHETIC, SliceSet
from fedsynth.core.weights import model_tensors

from .conftest import make_slices

runner = CliRunner()
N = 6  # images of each kind on the sheets made here
ID = re.compile(r"T\d{3}")


def synthetic_set(n: int = 20, seed: int = 7) -> SliceSet:
    """Stand-in synthetic slices: other blobs, marked synthetic, with telling source names."""
    blobs = make_slices(n_patients=n, per_patient=1, seed=seed)
    return replace(blobs, split=np.full(n, SYNTHETIC), source=np.array([f"GENERATED-{i}" for i in range(n)]),
                   patient_ids=np.array([f"synthetic-{i}" for i in range(n)]), meta={"conditional": True})


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, SliceSet, SliceSet]:
    root = tmp_path_factory.mktemp("turing")
    real, synthetic = make_slices(), synthetic_set()
    real = replace(real, source=np.array([f"REALFILE-{i}" for i in range(len(real))]))
    key = make_test(real.images, real.labels, synthetic.images, synthetic.labels, real.class_names, N, 3,
                    root / "sheet", root / "organiser" / "key.json", {"real_slices": "test"}, real_split=real.split)
    return root / "sheet", root / "organiser" / "key.json", key, real, synthetic


class _Items(HTMLParser):
    """Each item's attributes and text, in page order, plus every attribute in the page."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[dict[str, list]] = []
        self.attributes: list[tuple[str, str]] = []
        self.depth = 0  # nesting depth inside the current item, 0 outside

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attributes += [(k, v or "") for k, v in attrs]
        if self.depth == 0 and ("class", "item") in attrs:
            self.items.append({"attrs": [], "text": []})
            self.depth = 1
        elif self.depth:
            self.depth += tag != "img"
        if self.depth:
            self.items[-1]["attrs"] += [(tag, k, v or "") for k, v in attrs]

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth and data.strip():
            self.items[-1]["text"].append(data.strip())


def _parse(html: str) -> _Items:
    parser = _Items()
    parser.feed(html)
    return parser


def test_sheet_answers_and_key_are_written_with_the_key_outside(made: tuple) -> None:
    out, key_path, key, _, _ = made
    assert sorted(p.name for p in out.iterdir()) == ["answers.csv", "sheet.html", "sheet.pdf"]
    assert json.loads(key_path.read_text()) == key
    ids = [f"T{i:03d}" for i in range(1, 2 * N + 1)]
    assert list(key["items"]) == ids
    with open(out / "answers.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == ids and {r["answer"] for r in rows} == {""}
    assert list(rows[0]) == ["id", "answer", "confidence"]
    assert [v["truth"] for v in key["items"].values()].count("real") == N
    assert key["real_pool"] == "holdout" and key["seed"] == 3


def test_the_sheet_shows_exactly_the_images_the_key_names(made: tuple) -> None:
    out, _, key, real, synthetic = made
    html = (out / "sheet.html").read_text()
    sources = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(sources) == 2 * N == html.count("data:image/")
    scale = key["display_scale"]
    assert 128 <= scale * real.image_size <= 192
    for (item_id, item), encoded in zip(key["items"].items(), sources, strict=True):
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
        kind = real if item["truth"] == "real" else synthetic
        original = kind.images[item["source_index"]]
        assert np.array_equal(shown[::scale, ::scale], original), item_id
        assert item["label"] == kind.class_names[kind.labels[item["source_index"]]]
        if item["truth"] == "real":
            assert real.split[item["source_index"]] == HOLDOUT, "real images come from patients never trained on"


def test_nothing_in_the_html_hints_at_the_source(made: tuple) -> None:
    out, _, key, real, _ = made
    html = (out / "sheet.html").read_text()
    page = _parse(html)
    assert len(page.items) == 2 * N
    # every item is the same template: only its id and its picture differ (so no label,
    # file name or source index sits beside an image, in its text or its attributes)
    texts = {" ".join(ID.sub("ID", t) for t in item["text"]) for item in page.items}
    assert len(texts) == 1
    shapes = {tuple((tag, k, ID.sub("ID", v) if k != "src" else "data") for tag, k, v in item["attrs"])
              for item in page.items}
    assert len(shapes) == 1
    for name, value in page.attributes:
        if name != "src":
            assert not re.search("real|synth", value, re.IGNORECASE), f"{name}={value!r} hints at the source"
    ids = [ID.search(" ".join(item["text"])).group() for item in page.items]
    assert ids == list(key["items"]), "ids must follow page order, so they carry no information"
    truths = [key["items"][i]["truth"] for i in ids]
    assert truths not in (sorted(truths), sorted(truths, reverse=True)), "the kinds must be shuffled together"
    visible = re.sub(r"data:image/png;base64,[^\"]+", "", html)
    for hint in ("REALFILE", "GENERATED", "source", "holdout", "lesion", *real.class_names):
        assert hint not in visible, f"{hint!r} appears in the sheet"
    assert not re.search(r"https?:|url\(|<link|<script", visible), "the sheet must carry everything inside"


def test_real_and_synthetic_images_show_the_same_class_mix(made: tuple) -> None:
    """An unequal mix of classes would tell the expert which images are which."""
    key = made[2]
    counts = {truth: sorted(item["label"] for item in key["items"].values() if item["truth"] == truth)
              for truth in ("real", "synthetic")}
    assert counts["real"] == counts["synthetic"] and len(set(counts["real"])) > 1


def test_the_pdf_carries_every_id_once(made: tuple) -> None:
    out, _, key, _, _ = made
    reader = PdfReader(out / "sheet.pdf")
    text = "\n".join(page.extract_text() for page in reader.pages)
    assert "tick one box" in text
    assert sorted(ID.findall(text)) == sorted(list(key["items"]) + ["T001", "T002"])  # two named in the instructions
    assert "lesion" not in text
    ids_in_order = [i for i in ID.findall("\n".join(p.extract_text() for p in reader.pages[1:]))]
    assert ids_in_order == list(key["items"])


def test_a_key_inside_the_sheet_folder_is_refused(tmp_path: Path) -> None:
    real, synthetic = make_slices(), synthetic_set()
    with pytest.raises(TuringError, match="inside"):
        make_test(real.images, real.labels, synthetic.images, None, real.class_names, N, 0,
                  tmp_path / "sheet", tmp_path / "sheet" / "keys" / "key.json", {})
    assert not (tmp_path / "sheet").exists(), "nothing may be written when the key is refused"


def test_an_existing_sheet_or_key_is_never_overwritten(made: tuple, tmp_path: Path) -> None:
    out, key_path, _, real, synthetic = made
    before = (out / "sheet.html").read_bytes(), key_path.read_bytes()
    for sheet, key in ((out, tmp_path / "new-key.json"), (tmp_path / "new-sheet", key_path)):
        with pytest.raises(TuringError, match="already exists"):
            make_test(real.images, real.labels, synthetic.images, None, real.class_names, N, 0, sheet, key, {})
    assert ((out / "sheet.html").read_bytes(), key_path.read_bytes()) == before
    assert not (tmp_path / "new-key.json").exists() and not (tmp_path / "new-sheet").exists()


def test_too_small_a_holdout_falls_back_to_all_real_slices_and_says_so(tmp_path: Path) -> None:
    real, synthetic = make_slices(), synthetic_set()
    held = int(np.sum(real.split == HOLDOUT))
    key = make_test(real.images, real.labels, synthetic.images, None, real.class_names, held + 2, 0,
                    tmp_path / "sheet", tmp_path / "key.json", {}, real_split=real.split)
    assert key["real_pool"].startswith("all real slices") and str(held) in key["real_pool"]
    assert {i["label"] for i in key["items"].values() if i["truth"] == "synthetic"} == {None}


def _key(n: int = 80) -> dict:
    """A key as make_test writes it, for scoring: n real then n synthetic, two classes."""
    truths = ["real"] * n + ["synthetic"] * n
    return {"items": {f"T{i + 1:03d}": {"truth": t, "label": ("a", "b")[i % 2], "source_index": i}
                      for i, t in enumerate(truths)}}


def _two_sided_p(correct: int, total: int) -> float:
    """Exact binomial test against 0.5, by hand: twice the smaller tail."""
    tail = sum(math.comb(total, k) for k in range(min(correct, total - correct) + 1)) / 2**total
    return min(1.0, 2 * tail)


def test_a_perfect_sheet_scores_one_and_beats_chance() -> None:
    key = _key()
    result = score(key, [{"id": i, "answer": v["truth"], "confidence": "5"} for i, v in key["items"].items()])
    assert result["accuracy"] == 1 and result["p_value"] < 0.001
    assert result["sensitivity"] == result["specificity"] == 1
    assert result["accuracy_ci95"][1] == 1 and 0.95 < result["accuracy_ci95"][0] < 1
    assert result["per_class"]["a"]["accuracy"] == 1 and result["per_class"]["a"]["n"] == 80
    assert "told them apart" in result["interpretation"] and "p < 0.001" in result["interpretation"]


def test_a_coin_flipping_expert_is_not_better_than_chance() -> None:
    key = _key()
    rng = np.random.default_rng(2024)
    rows = [{"id": i, "answer": rng.choice(["real", "synthetic"]), "confidence": ""} for i in key["items"]]
    correct = sum(r["answer"] == key["items"][r["id"]]["truth"] for r in rows)
    result = score(key, rows)
    assert result["n_correct"] == correct and result["accuracy"] == pytest.approx(correct / 160)
    assert result["p_value"] == pytest.approx(_two_sided_p(correct, 160)) and result["p_value"] > 0.05
    assert result["accuracy_ci95"][0] < 0.5 < result["accuracy_ci95"][1]
    assert "could not tell synthetic from real better than chance" in result["interpretation"]


def test_sensitivity_and_specificity_say_which_way_the_expert_errs() -> None:
    key = _key(10)
    result = score(key, [{"id": i, "answer": "S"} for i in key["items"]])  # everything called synthetic
    assert result["accuracy"] == 0.5 and result["sensitivity"] == 1 and result["specificity"] == 0


def test_missing_answers_are_reported_not_counted() -> None:
    key = _key(10)
    ids = list(key["items"])
    rows = [{"id": i, "answer": "R" if key["items"][i]["truth"] == "real" else "synthetic"} for i in ids[2:-1]]
    rows.append({"id": ids[-1], "answer": "", "confidence": ""})
    result = score(key, rows)
    assert result["missing"] == [ids[0], ids[1], ids[-1]]
    assert result["n_answered"] == 17 and result["accuracy"] == 1
    assert "3 images left unanswered" in result["interpretation"]


@pytest.mark.parametrize(("row", "message"), [
    ({"id": "T004", "answer": "maybe"}, r"line 5 \(id T004\): answer 'maybe'"),
    ({"id": "T004", "answer": "1"}, r"id T004.*not real or synthetic"),
    ({"id": "T004", "answer": "real", "confidence": "9"}, r"id T004.*confidence '9'"),
    ({"id": "X999", "answer": "real"}, "ids not in the key: X999"),
])
def test_a_bad_answer_names_the_id(row: dict, message: str) -> None:
    key = _key(10)
    rows = [{"id": f"T00{i}", "answer": "real"} for i in (1, 2, 3)] + [row]
    with pytest.raises(TuringError, match=message):
        score(key, rows)


def test_the_cli_makes_and_scores_a_test(tmp_path: Path) -> None:
    real_path = make_slices().save(tmp_path / "real.npz")
    synthetic_path = synthetic_set().save(tmp_path / "synthetic.npz")
    out = tmp_path / "sheet"
    made = runner.invoke(app, ["turing-test", "--synthetic", str(synthetic_path), "--data", str(real_path),
                               "--n", str(N), "--out", str(out), "--seed", "1"])
    assert made.exit_code == 0, made.output
    key_path = tmp_path / "sheet-key.json"  # the default: beside the folder, not in it
    assert key_path.is_file() and "keep it" in made.output
    key = json.loads(key_path.read_text())
    assert key["provenance"]["synthetic_file"] == str(synthetic_path)

    answers = out / "answers.csv"
    with open(answers, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for k, row in enumerate(rows):  # right except for the first two
        truth = key["items"][row["id"]]["truth"]
        row["answer"] = truth if k >= 2 else {"real": "synthetic", "synthetic": "real"}[truth]
    with open(answers, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "answer", "confidence"])
        writer.writeheader()
        writer.writerows(rows)
    files = sorted(tmp_path.rglob("*"))
    scored = runner.invoke(app, ["turing-test", "score", str(key_path), str(answers)])
    assert scored.exit_code == 0, scored.output
    assert f"{2 * N - 2} right" in scored.output and f"{(2 * N - 2) / (2 * N):.2f}" in scored.output
    assert sorted(tmp_path.rglob("*")) == files, "score writes nothing without --json"
    scored = runner.invoke(app, ["turing-test", "score", str(key_path), str(answers), "--json",
                                 str(tmp_path / "scores.json")])
    assert scored.exit_code == 0, scored.output
    assert json.loads((tmp_path / "scores.json").read_text())["n_correct"] == 2 * N - 2

    again = runner.invoke(app, ["turing-test", "--synthetic", str(synthetic_path), "--data", str(real_path),
                                "--n", str(N), "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output
    inside = runner.invoke(app, ["turing-test", "--synthetic", str(synthetic_path), "--data", str(real_path),
                                 "--n", str(N), "--out", str(tmp_path / "other"), "--key", str(tmp_path / "other" / "k.json")])
    assert inside.exit_code == 1 and "inside" in inside.output
    answers.write_text(answers.read_text().replace(f"{rows[3]['id']},{rows[3]['answer']}",
                                                   f"{rows[3]['id']},perhaps", 1))
    bad = runner.invoke(app, ["turing-test", "score", str(key_path), str(answers)])
    assert bad.exit_code == 1 and "error:" in bad.output
    assert str(answers) in bad.output and rows[3]["id"] in bad.output and "perhaps" in bad.output
    no_data = runner.invoke(app, ["turing-test", "--synthetic", str(synthetic_path)])
    assert no_data.exit_code == 1 and "--data is required" in no_data.output


def test_the_cli_draws_from_a_run(tmp_path: Path) -> None:
    """A run with only its initial generator (round 0): drawing, not training, is tested."""
    real = make_slices()
    real_path = real.save(tmp_path / "real.npz")
    cfg = RunConfig.from_overrides({"data.image-size": 32, "data.class-names": ",".join(real.class_names),
                                    "model.width": 8, "model.latent-dim": 16})
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config_path.write_text(cfg.to_yaml())
    gen, _ = build_gan(cfg.model, image_size=32, num_classes=2)
    save_checkpoint(run.checkpoint(0), model_tensors(gen), {"round": "0"})
    result = runner.invoke(app, ["turing-test", "--run", str(run.root), "--data", str(real_path), "--n", "4",
                                 "--out", str(tmp_path / "sheet")])
    assert result.exit_code == 0, result.output
    key = json.loads((tmp_path / "sheet-key.json").read_text())
    assert key["provenance"]["round"] == 0 and len(key["provenance"]["checkpoint_sha256"]) == 64
    drawn = [v for v in key["items"].values() if v["truth"] == "synthetic"]
    assert len(drawn) == 4 and {v["label"] for v in drawn} == set(real.class_names)
