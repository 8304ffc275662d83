"""Progress in logs: plain lines, no carriage-return frames (issue 23)."""

import io

from uadjax import progress


def test_log_progress_prints_plain_periodic_lines():
    out = io.StringIO()
    bar = progress.LogProgress(total=10, initial=2, desc="train/x", interval=0.0, file=out)
    for _ in range(3):
        bar.update()
    bar.set_postfix(loss="0.1234")
    bar.close()
    bar.close()  # idempotent
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 4  # three updates at interval 0, one at close
    assert lines[0].startswith("train/x: 3/10 (30 %)")
    assert lines[-1].startswith("train/x: 5/10 (50 %)") and lines[-1].endswith("loss=0.1234")
    assert "left" in lines[-1]


def test_log_progress_wraps_an_iterable_and_rate_limits():
    out = io.StringIO()
    items = list(progress.LogProgress(range(5), desc="score", interval=3600.0, file=out))
    assert items == list(range(5))
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]  # only the close
    assert out.getvalue().startswith("score: 5/5 (100 %)")


def test_progress_bar_is_tqdm_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a tty
    assert isinstance(progress.progress_bar(range(2), desc="a"), progress.LogProgress)
    assert not isinstance(progress.progress_bar(range(2), disable=True),
                          progress.LogProgress)
