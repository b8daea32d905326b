"""Put a reasoning-benchmark grid's results into a Markdown page (``docs/reasoning_bench.md``).

The page keeps its prose; what the grid measured goes between marker comments, so the numbers
in the docs are always one grid's output and never edited by hand:

    <!-- generated: results -->          the grid's tables (results.md), its plot and wall time
    <!-- end generated: results -->
    <!-- generated: teacher-time -->     teacher_time.json as a table (when it was measured)
    <!-- end generated: teacher-time -->

The plot is copied beside the page as ``<page stem>.png``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.config import ConfigError

SECTIONS = ("results", "teacher-time")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"


def splice(page: str, name: str, body: str, where: str) -> str:
    """``page`` with the text between section ``name``'s markers replaced by ``body``."""
    begin, end = _markers(name)
    if page.count(begin) != 1 or page.count(end) != 1 or page.index(begin) > page.index(end):
        raise ConfigError(
            f"{where}: needs one '{begin}' line followed by one '{end}' line; add them where "
            "the generated text goes"
        )
    head, rest = page.split(begin)
    _, tail = rest.split(end)
    note = "<!-- written by `cot2align reasoning-bench --publish`; do not edit by hand -->"
    return f"{head}{begin}\n{note}\n\n{body.strip()}\n\n{end}{tail}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def wall_time_line(results: dict) -> str:
    """What the grid cost: its shared stages, the students summed over every run, this call."""
    timings = results["timings"]
    train_s = sum(sum(cell["train_s_per_seed"]) for cell in results["cells"].values())
    runs = sum(len(cell["train_s_per_seed"]) for cell in results["cells"].values())
    jobs = timings.get("jobs", 1)
    at_once = f", {jobs} at a time" if jobs > 1 else ""
    return (
        f"Cost on the machine that ran it: teacher fine-tuning {_minutes(timings['teacher_train_s'])}, "
        f"rationales {timings['augment_s']:.0f} s, {runs} student runs "
        f"{_minutes(train_s)} of training{at_once} (scoring not included); the last invocation took "
        f"{_minutes(timings['wall_s'])} and resumed {timings['runs_resumed']} runs an earlier, "
        f"stopped one had finished."
    )


def results_body(output_dir: Path, image: str) -> str:
    table = (output_dir / "results.md").read_text(encoding="utf-8")
    # The page has its own title; the grid's image link points beside the grid.
    table = re.sub(r"\A# [^\n]*\n+", "", table).replace("![results](results.png)", "")
    results = json.loads((output_dir / "results.json").read_text(encoding="utf-8"))
    return f"{table.strip()}\n\n{wall_time_line(results)}\n\n![reasoning benchmark]({image})"


def publish_results(output_dir: Path, page: Path) -> list[str]:
    """Write the grid in ``output_dir`` into ``page``; returns the sections it replaced."""
    from cot2align_ds.experiments.reasoning_bench import TEACHER_TIME_FILE, teacher_time_table

    output_dir, page = Path(output_dir), Path(page)
    for needed in ("results.md", "results.json", "results.png"):
        if not (output_dir / needed).is_file():
            raise ConfigError(f"--output-dir '{output_dir}' has no {needed}: run the grid first")
    if not page.is_file():
        raise ConfigError(f"--publish '{page}' is not a file; give the Markdown page to update")
    text = page.read_text(encoding="utf-8")
    image = f"{page.stem}.png"
    text = splice(text, "results", results_body(output_dir, image), str(page))
    done = ["results"]
    timed = output_dir / TEACHER_TIME_FILE
    if timed.is_file():
        table = teacher_time_table(json.loads(timed.read_text(encoding="utf-8")))
        text = splice(text, "teacher-time", table, str(page))
        done.append("teacher-time")
    # The plot first: a page never points at an image that is not there.
    shutil.copyfile(output_dir / "results.png", page.parent / image)
    write_text_atomic(page, text)
    return done
