"""docs/RESULTS.md and the README's demo table are what the committed result files give."""

import json
import re
import shutil

import pytest

from benchmarks.results import (
    BEGIN,
    END,
    README,
    RESULTS_DIR,
    RESULTS_MD,
    ROOT,
    readme_block,
    results_doc,
    with_readme_block,
)


def test_results_doc_and_the_readme_table_are_regenerated_from_the_files():
    assert RESULTS_MD.read_text() == results_doc(), "docs/RESULTS.md is stale: run python -m benchmarks.results"
    readme = README.read_text()
    assert with_readme_block(readme, readme_block()) == readme, "README's demo table is stale: same command"


def test_every_figure_and_the_date_come_from_the_files(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, folder)
    demo = json.loads((folder / "demo.json").read_text())
    demo["metrics"][1]["miou"] = 0.01234
    demo["run"]["date"] = "1999-01-02T03:04:05+00:00"
    (folder / "demo.json").write_text(json.dumps(demo))
    text = results_doc(folder)
    assert f"| {demo['metrics'][1]['method']} | 1.2 |" in text
    assert "1999-01-02T03:04:05+00:00" in text and "1999-01-02T03:04:05+00:00" in readme_block(folder)
    assert results_doc(folder) != results_doc(RESULTS_DIR)

    del demo["run"]
    (folder / "demo.json").write_text(json.dumps(demo))
    assert "not recorded in this file" in results_doc(folder)
    (folder / "demo.json").unlink()
    (folder / "bench_random_walk.json").unlink()
    text = results_doc(folder)
    assert "No result committed yet. To produce it: `rib demo" in text
    assert "`python -m benchmarks.bench_random_walk --size 500 375 > docs/results/bench_random_walk.json`" in text
    assert "No demo result committed yet" in readme_block(folder)


def test_a_readme_without_the_markers_is_refused():
    with pytest.raises(ValueError, match="markers"):
        with_readme_block("# a README\n", readme_block())


def test_the_readme_is_short_shows_a_picture_and_links_documents_that_exist():
    readme = README.read_text()
    assert len(readme.splitlines()) <= 150
    assert readme.index(BEGIN) < readme.index(END)
    links = re.findall(r"\]\(([^)#]+)", readme)
    assert "docs/img/demo.png" in links and "docs/RESULTS.md" in links and "docs/USAGE.md" in links
    for link in links:
        assert (ROOT / link).exists(), link
