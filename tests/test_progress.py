"""Progress in a log (not a terminal): a start line, a line at least every `every` seconds with rate and ETA, an end line."""

from bne.progress import progress


def test_log_lines_carry_steps_rate_and_eta(capsys):
    assert list(progress(range(4), desc="train", unit="img", items_per_step=8, every=0.0)) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "train: 0/4 img, started"
    assert lines[1].startswith("train: 1/4, ") and " img/s" in lines[1] and "ETA" in lines[1]
    assert lines[-1].startswith("train: 4/4, ") and lines[-1].endswith("(done)") and len(lines) == 6


def test_quiet_between_intervals_and_when_disabled(capsys):
    list(progress(range(100), desc="x", every=3600.0))
    assert len(capsys.readouterr().err.strip().splitlines()) == 2  # start and end only
    list(progress(range(3), desc="x", enabled=False))
    assert capsys.readouterr().err == ""
