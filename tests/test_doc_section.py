"""benchmarks/doc_section.py: each report rewrites only its own marked section of a doc."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "doc_section.py"
_spec = importlib.util.spec_from_file_location("doc_section", _PATH)
doc_section = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_section)


def test_write_section_replaces_only_its_own_section(tmp_path):
    md = tmp_path / "results.md"
    md.write_text("# Results\n\nhand-written intro\n")
    doc_section.write_section(md, "timm", "## timm\nold")
    doc_section.write_section(md, "torchvision", "## torchvision\nfirst")
    doc_section.write_section(md, "torchvision", "## torchvision\nsecond")
    doc_section.write_section(md, "timm", "## timm\nnew")
    text = md.read_text()
    assert text.startswith("# Results\n\nhand-written intro\n\n<!-- timm:begin -->\n## timm\nnew\n<!-- timm:end -->")
    assert text.count("<!-- torchvision:begin -->") == 1 and "first" not in text and "second" in text
    assert "old" not in text and text.index("## timm") < text.index("## torchvision")


def test_write_section_keeps_text_after_the_section(tmp_path):
    md = tmp_path / "doc.md"
    md.write_text("a\n<!-- x:begin -->\nold\n<!-- x:end -->\n\ntail stays\n")
    doc_section.write_section(md, "x", "new")
    assert md.read_text() == "a\n<!-- x:begin -->\nnew\n<!-- x:end -->\n\ntail stays\n"
