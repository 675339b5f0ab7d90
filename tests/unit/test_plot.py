"""`herl plot`: one PNG of a run's curves, from its tables."""

from __future__ import annotations

from herl.commands.cli import main


def test_plot_of_a_finished_run(done_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(done_run.path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # six panels with lines, not a blank canvas
    assert not list(tmp_path.glob(".*.tmp"))
    assert main(["plot", str(tmp_path)]) == 2  # not a run: one line, exit 2


def test_the_kl_panel_only_when_there_is_a_kl_term():
    from herl.runs.plot import kl_or_grad_norm

    off = {"kl": [(0, 0.0), (1, 0.0)], "grad_norm": [(0, 0.5), (1, 0.4)]}
    on = {"kl": [(0, 0.0), (1, 0.002)], "grad_norm": [(0, 0.5), (1, 0.4)]}
    assert kl_or_grad_norm(off) == ({"grad_norm": off["grad_norm"]}, "gradient norm (before clipping; KL is off)")
    assert kl_or_grad_norm(on)[0] == {"kl": on["kl"]} and "KL" in kl_or_grad_norm(on)[1]
