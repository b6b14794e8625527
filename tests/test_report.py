"""``write_report``: a real ledger (an MLP on digits with flipped labels, two runs) rendered in headless Chromium.

The report is checked as a browser sees it (every image decoded, nothing fetched), against the ledger's own
numbers, and for what it promises: thumbnails of the right samples upscaled with nearest neighbour, a note
where a section cannot be computed, an atomic write, and curves read only for the samples shown.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

import lossledger as ll
from lossledger.analysis import accuracy_vs_threshold, entropy_vs_action, flag_noisy, memorization_window, neighbours
from lossledger.errors import InputPathError, OutputPathError, ShapeMismatchError, UnknownStreamError

pytest.importorskip("sklearn", reason="the report test trains on scikit-learn's digits")
pytest.importorskip("matplotlib", reason="the report draws with matplotlib: pip install 'lossledger[report]'")
from PIL import Image  # Pillow: a dependency of matplotlib
from sklearn.datasets import load_digits

from lossledger._figures import Images
from lossledger.demo_training import load_data, train
from lossledger.report import write_report

RUN, SECOND = "mlp-s0", "mlp-s1"
#: The sections of a run that logged probs and embedding (RUN, as the demo trains it); without those streams
#: (SECOND) the two sections are left out.
HEADINGS = ["Summary", "Per-class difficulty", "Hardest samples", "Easiest samples",
            "Loss curves of the hardest samples", "Loss-curve clusters", "Nearest neighbours of the hardest samples",
            "Noisy-label candidates", "Memorization window", "Action vs entropy", "Run correlations"]
WITHOUT_PREDICTIONS = [h for h in HEADINGS if h not in ("Nearest neighbours of the hardest samples", "Action vs entropy")]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> ll.Ledger:
    """15 epochs of the demo's MLP on digits (20% flipped; loss, correct, probs every epoch, embedding at the
    last), and a second seed's losses logged as a second run (loss only)."""
    tmp = tmp_path_factory.mktemp("report")
    data = load_data(noise=0.2, seed=0)
    ledger = train(data, tmp / "digits.ll", epochs=15, seed=0, run=RUN)
    losses = train(data, tmp / "second.ll", epochs=10, seed=1, run=SECOND).trajectories(SECOND, "loss")
    with ledger.run(SECOND, seed=1) as run:
        for t in range(losses.shape[1]):
            run.log(ledger.sample_ids, loss=losses[:, t])
            run.end_epoch()
    return ledger


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """(1797, 8, 8) grey levels 0..16, in the ledger's row order (load_data keeps scikit-learn's order)."""
    return load_digits().images


class _Page(HTMLParser):
    """Headings, images (attributes) and every src/href of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.h2: list[str] = []
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self._in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        self._in_h2 = tag == "h2"
        if tag == "img":
            self.images.append(a)
        self.links += [a[k] for k in ("src", "href") if k in a]

    def handle_endtag(self, tag: str) -> None:
        self._in_h2 = False if tag == "h2" else self._in_h2

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.h2.append(data)


def _png(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,"), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L"))


def _section(text: str, key: str) -> str:
    return re.search(rf'<section id="{key}">(.*?)</section>', text, re.DOTALL).group(1)


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    # No network at all: an external resource could not load even if the page asked for one.
    command = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               f"--user-data-dir={tmp / 'chromium-profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
               "--virtual-time-budget=10000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_report_renders_in_chromium_with_every_figure_and_thumbnail(ledger, digits, tmp_path):
    out = write_report(ledger, tmp_path / "report.html", images=digits)
    assert out == tmp_path / "report.html"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # the temp file was renamed, not left
    text = out.read_text()
    page = _Page(text)
    assert page.h2 == HEADINGS
    # Self-contained: every src/href is inline data or an anchor; no script, stylesheet link or CSS url().
    assert page.links and all(link.startswith(("data:image/png;base64,", "#")) for link in page.links)
    assert not any(link.startswith(("http:", "https:", "//")) for link in page.links)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", text)
    assert not {"script", "link", "iframe", "object"} & page.tags and "url(" not in text

    plots = [i for i in page.images if i.get("class") == "plot"]
    clusters_installed = importlib.util.find_spec("lossledger.analysis.clusters") is not None
    # classes, curves, [clusters], noisy, window, entropy scatter and accuracy curves, correlations
    assert len(plots) == 7 + clusters_installed
    assert ("Not computed" in _section(text, "clusters")) is not clusters_installed
    for key in ("classes", "hardest", "easiest", "curves", "neighbours", "noisy", "window", "entropy", "correlations"):
        assert "Not computed" not in _section(text, key), key
    for image in plots:
        pixels = _png(image["src"])
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 10  # drawn, not blank

    # Galleries: thumbnails of the ranked samples, in order, 8x8 upscaled 12x with nearest neighbour.
    thumbs = [i for i in page.images if i.get("class") == "thumb"]
    assert len(thumbs) == 16 + 16 + 8 * (1 + 8) + 16  # hardest, easiest, 8 hard with 8 neighbours, candidates
    hard = ledger.top(16, RUN)["sample_id"].to_pylist()
    easy = ledger.top(16, RUN, hardest=False)["sample_id"].to_pylist()
    assert [t["alt"] for t in thumbs[:32]] == [f"sample {i}" for i in hard + easy]
    near = neighbours(ledger, RUN, k=8, top=8)  # Fig 5: rows in the API's order, each query then its neighbours
    expected = []
    for query in dict.fromkeys(near["query_id"].to_pylist()):
        mine = near.filter(pc.equal(near["query_id"], query))["neighbour_id"].to_pylist()
        expected += [f"sample {query}", *[f"neighbour {n} of {query}" for n in mine]]
    assert [t["alt"] for t in thumbs[32:104]] == expected
    candidates = flag_noisy(ledger, RUN, ticks=memorization_window(ledger, RUN).ticks).table["sample_id"].to_pylist()
    in_near = near["query_id"].to_pylist() + near["neighbour_id"].to_pylist()
    shown = digits[hard + easy + candidates[:16] + in_near]  # the grey range is that of the images shown
    lo, hi = min(shown.min(), 0.0), shown.max()
    for thumb in thumbs[:104]:
        pixels = _png(thumb["src"]).astype(float)
        assert pixels.shape == (96, 96)
        blocks = pixels[::12, ::12]
        assert np.array_equal(np.kron(blocks, np.ones((12, 12))), pixels)  # nearest: constant 12x12 blocks
        row = int(thumb["alt"].split()[1])  # ids are rows in this ledger; "sample ID" or "neighbour ID of Q"
        assert np.abs(blocks - 255 * (digits[row] - lo) / (hi - lo)).max() <= 1.5  # the right digit, grey levels kept

    # Table 1: the overall r of the two runs is the ledger's.
    r = ledger.correlate([RUN, SECOND], by_class=False)["r"][0].as_py()
    assert f'<td>{RUN} vs {SECOND}</td><td class="num">{r:.4g}</td>' in _section(text, "correlations")

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the browser rendering was not checked")
    # In the browser: a probe (added to a copy) records whether each image decoded.
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", "<script>window.addEventListener('load', () => document.body.setAttribute("
                                  "'data-probe', JSON.stringify([...document.images].map(i => [i.complete, "
                                  "i.naturalWidth, i.naturalHeight]))));</script></body>"))
    dom = _chromium("--dump-dom", probe.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found, dom.stdout[:500]
    loaded = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(loaded) == len(page.images) and all(ok and w > 0 and h > 0 for ok, w, h in loaded), loaded
    shot = tmp_path / "report.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1280,4000", out.as_uri(), tmp=tmp_path)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (4000, 1280)
    assert (pixels < 128).mean() > 0.03  # text, figures and thumbnails: not an empty page
    print(f"screenshot: {shot}")


def test_report_numbers_are_the_ledgers_and_missing_parts_say_why(ledger, digits, tmp_path, monkeypatch):
    # The clusters module made absent: its section must say so, not draw something else.
    monkeypatch.setitem(sys.modules, "lossledger.analysis.clusters", None)
    reads: list[int] = []
    trajectories = ll.Ledger.trajectories

    def counted(self, run, stream="loss", ids=None, ticks=None):
        reads.append(-1 if ids is None else len(ids))
        return trajectories(self, run, stream, ids, ticks)

    monkeypatch.setattr(ll.Ledger, "trajectories", counted)
    out = write_report(str(ledger.path), tmp_path / "r.html", runs=[RUN], top=5, neighbour_rows=3, neighbour_k=4)
    text = out.read_text()
    assert _Page(text).h2 == HEADINGS
    assert "no lossledger.analysis.clusters module" in _section(text, "clusters")
    assert "Not computed: correlations need at least two runs" in _section(text, "correlations")
    assert "the first of 2 runs" in _section(text, "summary") and "1,797" in _section(text, "summary")
    assert reads and min(reads) >= 0 and sum(reads) <= 2 * 5  # curves of the 5 hardest and 5 easiest only
    assert 'class="thumb"' not in text and "<table" in _section(text, "hardest")  # no images: ids, labels, action

    window = memorization_window(ledger, RUN)
    noisy = flag_noisy(ledger, RUN, ticks=window.ticks)
    section = _section(text, "noisy")
    assert f"{noisy.threshold:.6g}" in section
    assert f"{len(noisy.flagged_ids):,} of {noisy.table.num_rows:,} candidates" in section
    assert f"ticks {window.start}..{window.stop - 1}" in section
    first = re.findall(r"<td class=\"num\">(\d+)</td><td class=\"num\">(\d+)</td>", section)[0]
    assert int(first[1]) == noisy.table["sample_id"][0].as_py()
    hardest = ledger.top(5, RUN)
    assert re.findall(r'<tr><td class="num">1</td><td class="num">(\d+)</td>', _section(text, "hardest")) == [
        str(hardest["sample_id"][0].as_py())]
    assert f'<td class="num">{hardest["action"][0].as_py():.4g}</td>' in _section(text, "hardest")
    labels = ledger.samples["label"].to_numpy()
    action = ledger.scores(RUN)["action"].to_numpy()
    worst = max(range(10), key=lambda c: np.median(action[labels == c]))
    row = re.search(r"<tbody><tr><td>(\d)</td><td class=\"num\">(\d+)</td><td class=\"num\">([\d.]+)</td>",
                    _section(text, "classes"))
    assert (int(row.group(1)), int(row.group(2))) == (worst, int((labels == worst).sum()))
    assert float(row.group(3)) == pytest.approx(action[labels == worst].mean(), rel=1e-3)

    # Fig 5 without images: a table row per hard sample, "id · class · distance" per neighbour, as neighbours().
    near = neighbours(ledger, RUN, k=4, top=3)
    found = re.findall(r'<tr><td class="num">(\d)</td><td class="num">(\d+)</td><td>(\d)</td><td class="num">[^<]+</td>'
                       r"((?:<td>.*?</td>){4})</tr>", _section(text, "neighbours"))
    assert [int(q) for _, q, _, _ in found] == list(dict.fromkeys(near["query_id"].to_pylist()))
    cells = [[re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td>(.*?)</td>", c)] for *_, c in found]
    assert [x for row in cells for x in row] == [
        f"{n} · {lab} · {d:.4g}" for n, lab, d in zip(*(near[c].to_pylist() for c in
                                                        ("neighbour_id", "neighbour_label", "distance")))]

    # Figs 6b, 6c: the region counts and thresholds of entropy_vs_action, the accuracies of accuracy_vs_threshold.
    joint = entropy_vs_action(ledger, [RUN])
    limits = json.loads(joint.schema.metadata[b"lossledger"])
    section = _section(text, "entropy")
    for region in ("high action, low entropy", "low action, high entropy"):
        n = int(pc.sum(pc.equal(joint["region"], region)).as_py() or 0)
        assert f'<td>{region}</td><td class="num">{n}</td>' in section
    assert f"low ≤ {limits['action_low']:.4g}, high ≥ {limits['action_high']:.4g}" in section
    assert f"low ≤ {limits['entropy_low']:.4g}, high ≥ {limits['entropy_high']:.4g}" in section
    curves = accuracy_vs_threshold(ledger, [RUN], split="val", thresholds=[0.5])
    at_half = re.search(r'<tr><td class="num">0.5</td>(.*?)</tr>', section).group(1)
    assert re.findall(r">([^<]+)<", at_half) == [
        v for a, n in zip(curves["accuracy_mean"].to_pylist(), curves["n"].to_pylist()) for v in (f"{a:.4g}", str(n))]
    assert "the val split" in section


def test_sections_need_their_streams_and_say_why_when_they_cannot_be_computed(ledger, tmp_path):
    # The second run logged only losses: no neighbour or entropy section, and no error.
    text = write_report(ledger, tmp_path / "second.html", run=SECOND).read_text()
    assert _Page(text).h2 == WITHOUT_PREDICTIONS
    assert 'id="neighbours"' not in text and 'id="entropy"' not in text
    # A small ledger from the real writer: probs every tick but no correct stream, embedding only at tick 0.
    rng = np.random.default_rng(3)
    n, classes = 60, 3
    small = ll.create(tmp_path / "small.ll", n_samples=n, labels=np.arange(n) % classes)
    with small.run("r") as run:
        for t in range(4):
            logits = rng.normal(size=(n, classes))
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            run.log(small.sample_ids, loss=rng.gamma(2.0, 1.0 / (t + 1), size=n), probs=probs,
                    **({"embedding": rng.normal(size=(n, 5))} if t == 0 else {}))
            run.end_epoch()
    text = write_report(small, tmp_path / "small.html").read_text()
    assert _Page(text).h2 == HEADINGS
    assert "Not computed: no sample observed in &#x27;loss&#x27;" in _section(text, "neighbours")
    section = _section(text, "entropy")
    assert "No accuracy curves: run &#x27;r&#x27; has no &#x27;correct&#x27; stream" in section
    joint = entropy_vs_action(small, ["r"])
    for region in ("high action, low entropy", "low action, high entropy"):
        n_region = int(pc.sum(pc.equal(joint["region"], region)).as_py() or 0)
        assert f'<td>{region}</td><td class="num">{n_region}</td>' in section
    assert "split" not in re.search(r"<thead>(.*?)</thead>", section).group(1)  # no splits: one count column
    # The note is about the tick: at tick 0, where the embedding was logged, neighbours() finds them.
    assert neighbours(small, "r", k=2, top=1, tick=0).num_rows == 2



def test_report_refuses_bad_input_and_leaves_an_existing_file_untouched(ledger, digits, tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old")
    with pytest.raises(ShapeMismatchError, match="one image per sample"):
        write_report(ledger, out, images=digits[:10])
    with pytest.raises(ShapeMismatchError, match="positive integer"):
        write_report(ledger, out, top=0)
    with pytest.raises(ShapeMismatchError, match="neighbour_k must be a positive integer"):
        write_report(ledger, out, neighbour_k=0)
    with pytest.raises(UnknownStreamError, match="pass stream="):
        write_report(ledger, out, stream="nope")
    with pytest.raises(ShapeMismatchError, match="not a square number"):
        write_report(ledger, out, images=np.zeros((ledger.n_samples, 10)))
    with pytest.raises(InputPathError, match="no images file"):
        write_report(ledger, out, images=tmp_path / "missing.npz")
    np.savez(tmp_path / "images.npz", y=digits)
    with pytest.raises(ShapeMismatchError, match="key x"):
        write_report(ledger, out, images=tmp_path / "images.npz")
    (tmp_path / "images.npz").unlink()
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    with pytest.raises(OutputPathError, match="does not exist"):
        write_report(ledger, tmp_path / "missing" / "report.html")
    with pytest.raises(OutputPathError, match="is a folder"):
        write_report(ledger, tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"lossledger\[report\]"):
        write_report(ledger, out)


def test_flat_images_from_an_npz_file_show_as_the_square_images(digits, tmp_path):
    flat = tmp_path / "digits.npz"
    np.savez(flat, x=digits.reshape(len(digits), 64))  # (N, 64): scikit-learn's flattened digits
    from_file, from_array = Images(flat, len(digits)), Images(digits, len(digits))
    rows = np.array([0, 5, 1796])
    from_file.set_range(rows)
    from_array.set_range(rows)
    for row in rows:
        pixels = _png(re.search(r'src="([^"]+)"', from_file.tag(int(row), "x")).group(1))
        assert pixels.shape == (96, 96)
        assert np.array_equal(pixels, _png(re.search(r'src="([^"]+)"', from_array.tag(int(row), "x")).group(1)))
    with pytest.raises(ShapeMismatchError, match="one image per sample"):
        Images(flat, 10)
