"""`herl report` / `herl view`: the run's HTML page, opened in a real headless Chromium,
clicked to a revision; what it renders must be what the tables hold."""

from __future__ import annotations

import os
import shutil

import pytest

from herl.commands.cli import main
from herl.runs.query import connect_run
from herl.runs.report import word_diff, write_report
from tests.chromium import BINARY, Browser


def test_word_diff_rebuilds_both_texts():
    before, after = "The cat sat on the mat.", "The black cat sat on a mat!"
    ops = word_diff(before, after)
    assert "".join(t for op, t in ops if op != "+") == before and "".join(t for op, t in ops if op != "-") == after
    assert ["+", " black"] in ops and ["-", "the"] in ops and ["+", "a"] in ops


def test_commands_write_one_self_contained_file(done_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(done_run.path), "--out", str(out), "--iterations", "1"]) == 0
    page = out.read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # nothing fetched
    assert '"1": [' in page and '"0": [' not in page  # only the iteration asked for
    assert main(["report", str(done_run.path), "--iterations", "x"]) == 2


def _verdict_chips(browser, selector: str) -> list[tuple[str, str]]:
    return [tuple(x) for x in browser.js(
        f"[...document.querySelectorAll({selector!r} + ' .chip')].map(c => [c.dataset.item, c.dataset.verdict])")]


@pytest.mark.skipif(BINARY is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_page_in_chromium_shows_what_the_tables_hold(done_run, tmp_path, capsys):
    page = write_report(done_run.path, tmp_path / "report.html")
    con = connect_run(done_run.path)
    # a revision that was mixed into the batch, in place of a group member
    k, rev_id, pid, candidate, replaced, advantage, text = con.execute("""
        SELECT h.iteration, h.revision_id, h.prompt_id, h.candidate_rollout_id, b.replaced_rollout_id, b.advantage,
               h.response_text
        FROM hindsight h JOIN batch b ON b.iteration = h.iteration AND b.revision_id = h.revision_id
        WHERE b.replaced_rollout_id IS NOT NULL ORDER BY h.iteration, h.revision_id LIMIT 1""").fetchone()
    items = {r[0]: r[1] for r in con.execute(
        "SELECT item_index, item_id FROM (SELECT unnest(rubric, recursive := true), generate_subscripts(rubric, 1) - 1 "
        "AS item_index FROM prompts WHERE iteration = ? AND prompt_id = ?)", [k, pid]).fetchall()}

    browser = Browser()
    try:
        browser.open(page.as_uri())
        assert browser.js("document.title") == f"herl run {done_run.run_id}"
        # it opens on the newest iteration in numbers, the curves shown
        last = con.execute("SELECT max(iteration) FROM rollouts").fetchone()[0]
        n_prompts, mean = con.execute("SELECT count(DISTINCT prompt_id), avg(reward) FROM rewards WHERE iteration = ?",
                                      [last]).fetchone()
        summary = browser.js("document.querySelector('#detail .summary').textContent")
        assert summary.startswith(f"{n_prompts} prompts, ") and f"mean reward {mean:.3f}" in summary, summary
        assert browser.js("document.querySelector('details.curves').open")
        browser.js(f"(() => {{ const s = document.querySelector('#iteration'); s.value = '{k}'; "
                   "s.dispatchEvent(new Event('change')); })()")
        browser.click(f'nav button[data-prompt="{pid}"]')
        browser.click(f'[data-open-revision="{rev_id}"]')
        rev = f'[data-revision="{rev_id}"]'
        assert browser.js(f"!document.querySelector('{rev} .body').hidden")

        # the revision's verdicts, item by item, as hindsight_verdicts holds them
        want = [(items[i], v) for i, v in con.execute(
            "SELECT item_index, verdict FROM hindsight_verdicts WHERE iteration = ? AND sample_id = ? ORDER BY item_index",
            [k, rev_id]).fetchall()]
        assert _verdict_chips(browser, rev) == want and want
        # whom it replaced and its advantage
        head = browser.js(f"document.querySelector('{rev} .head').textContent")
        assert f"mixed in, replaced {replaced}" in head and f"advantage {advantage:.3f}" in head
        # the diff: the right pane reads as the revision, the left as its draft
        draft = con.execute("SELECT response_text FROM rollouts WHERE iteration = ? AND rollout_id = ?",
                            [k, candidate]).fetchone()[0]
        panes = browser.js(f"[...document.querySelectorAll('{rev} .diff .text')].map(e => e.textContent)")
        assert panes == [draft, text]
        # every answer of the group: its verdicts as the verdicts table holds them
        for (rollout_id,) in con.execute("SELECT rollout_id FROM rollouts WHERE iteration = ? AND prompt_id = ?",
                                         [k, pid]).fetchall():
            want = [(items[i], v) for i, v in con.execute(
                "SELECT item_index, verdict FROM verdicts WHERE iteration = ? AND sample_id = ? ORDER BY item_index",
                [k, rollout_id]).fetchall()]
            assert _verdict_chips(browser, f'[data-answer="{rollout_id}"]') == want
        assert "replaced by " + rev_id in browser.js(f"document.querySelector('[data-answer=\"{replaced}\"]').textContent")

        shot = browser.screenshot(tmp_path / "viewer.png")
        assert shot.stat().st_size > 30_000
        if os.environ.get("HERL_TEST_ARTIFACTS"):
            shutil.copy(shot, os.environ["HERL_TEST_ARTIFACTS"])
        with capsys.disabled():
            print(f"\nviewer screenshot: {shot}")
    finally:
        browser.close()
