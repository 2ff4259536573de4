"""The documentation: generated tables match their sources, links resolve, every shipped model has a card."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CARD_HEADINGS = ("Intended use", "Training data", "Metrics", "Limitations")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("docs_tables", REPO / "docs" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_committed_tables_match_their_sources(tables):
    assert tables.drifted(write=False) == [], "run: python docs/tables.py"


def test_a_drifted_table_is_detected(tables):
    text = (REPO / "README.md").read_text()
    assert "<!-- table:headline -->" in text
    body = text[text.index("<!-- table:headline -->"):]
    cell = re.search(r"\| \d+\.\d\d \|", body).group(0)  # the first number of the generated table
    tampered = text.replace(cell, "| 99.99 |", 1)
    assert tampered != text
    assert tables.regenerate(tampered, {}) == text


def test_every_table_marker_names_a_generator(tables):
    names = {m["name"] for p in _docs() for m in tables.MARKER.finditer(p.read_text())}
    assert {"presets", "headline", "runtimes"} <= names
    for name in names:
        assert tables.render(name).startswith("| ")


def test_headline_sources_are_one_line_each(tables):
    # a new result (a shipped model, a web-target row) is one more entry of this list
    for label, quality, program in tables.HEADLINE:
        assert tables.source(quality)["metrics"]["dsc"]["mean"] > 0, label
        if program:
            assert tables.source(program)["latency_ms"]["median"] > 0, label


def test_every_relative_link_resolves():
    broken = []
    for page in _docs():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not a link
        text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_every_shipped_model_has_a_card():
    assets = sorted((REPO / "edgeseg" / "assets").glob("*.safetensors"))
    assert assets
    for ckpt in assets:
        card = REPO / "docs" / "models" / f"{ckpt.stem}.md"
        assert card.exists(), f"no model card for {ckpt.name}: {card.relative_to(REPO)}"
        headings = re.findall(r"^## (.+)$", card.read_text(), flags=re.M)
        assert list(CARD_HEADINGS) == [h for h in headings if h in CARD_HEADINGS], card.name


def test_readme_is_a_front_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for command in ("pip install -e . && edgeseg distill", "pip install -e '.[dev]' && python -m pytest -q",
                    "edgeseg.Segmenter.from_pretrained()"):
        assert command in text
