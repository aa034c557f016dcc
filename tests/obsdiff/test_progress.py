"""obsdiff's progress bars: a finished bar stays as `leave` asks, a failed loop or block leaves no trace."""

import io

import pytest

from obsdiff.progress import tqdm


def test_a_finished_loop_keeps_its_bar():
    out = io.StringIO()
    assert list(tqdm(range(3), desc="work", file=out, mininterval=0)) == [0, 1, 2]
    assert out.getvalue().endswith("\n") and "work: 100%|" in out.getvalue().rsplit("\r", 1)[-1]


def test_a_failed_loop_blanks_its_line():
    out = io.StringIO()
    with pytest.raises(ZeroDivisionError):
        for i in tqdm(range(3), desc="work", file=out, mininterval=0):
            if i == 1:
                raise ZeroDivisionError
    text = out.getvalue()
    assert "work:  33%|" in text  # it was drawn, then wiped: no newline, the last frame is blank
    assert "\n" not in text and text.endswith("\r") and not text.rsplit("\r", 2)[-2].strip()


def test_a_failed_with_block_blanks_its_line():
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt), tqdm(total=2, desc="load", file=out, mininterval=0) as bar:
        bar.update()
        raise KeyboardInterrupt
    assert "\n" not in out.getvalue() and not out.getvalue().rsplit("\r", 2)[-2].strip()
    out = io.StringIO()
    with tqdm(total=1, desc="load", file=out) as bar:
        bar.update()
    assert out.getvalue().endswith("\n")


def test_a_disabled_bar_only_iterates():
    out = io.StringIO()
    assert list(tqdm(iter("ab"), file=out, disable=True)) == ["a", "b"] and out.getvalue() == ""
