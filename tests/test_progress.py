"""Progress of long commands: tqdm on a terminal, plain lines without carriage returns in a log."""

import io

from cloud_jax import progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_line_per_interval_and_one_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = progress.LogProgress(400, "responses", desc="critique", file=out, interval=30,
                               clock=clock)
    for _ in range(5):  # 8 responses every 10 seconds
        clock.now += 10
        bar.update(8)
        bar.set_postfix(tokens_per_s="12.5")
    clock.now += 40  # then slower: 8 in 40 seconds
    bar.update(8)
    clock.now += 10
    bar.update(4)
    bar.close()
    bar.close()  # a second close writes nothing
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "critique: 24/400 responses (6.0%), 0.8 responses/s, 00:30 elapsed, 07:50 left, "
        "tokens_per_s=12.5",
        # The rate since the line before: 24 in 60 seconds.
        "critique: 48/400 responses (12.0%), 0.4 responses/s, 01:30 elapsed, 14:40 left, "
        "tokens_per_s=12.5",
        # The end line: the rate over the whole run, 52 in 100 seconds.
        "critique: 52/400 responses (13.0%), 0.5 responses/s, 01:40 elapsed, 11:09 left, "
        "tokens_per_s=12.5"]


def test_the_end_line_is_not_repeated_and_a_finished_bar_shows_no_time_left():
    out, clock = io.StringIO(), Clock()
    with progress.LogProgress(10, "responses", file=out, interval=5, clock=clock) as bar:
        clock.now += 5
        bar.update(10)
    assert out.getvalue() == "10/10 responses (100.0%), 2.0 responses/s, 00:05 elapsed\n"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdm_and_a_file_plain_lines():
    tty = Terminal()
    with progress.bar(3, "responses", desc="score", file=tty) as bar:
        bar.update(3)
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()
    log = io.StringIO()
    with progress.bar(3, "responses", desc="score", file=log) as bar:
        bar.update(3)
    assert log.getvalue().startswith("score: 3/3 responses (100.0%)") and "\r" not in log.getvalue()
    off = io.StringIO()
    with progress.bar(3, "responses", file=off, disable=True) as bar:
        bar.update(3)
    assert off.getvalue() == ""


def test_a_resumed_bar_counts_from_where_it_starts_and_rates_only_the_new_items():
    # A training run resumed at step 40 of 100: the line shows 50/100 and the rate of the 10
    # steps it ran, not of 50 steps in 10 seconds.
    out, clock = io.StringIO(), Clock()
    with progress.LogProgress(100, "steps", desc="cloud", file=out, initial=40,
                              clock=clock) as bar:
        clock.now += 10
        bar.update(10)
    assert out.getvalue() == "cloud: 50/100 steps (50.0%), 1.0 steps/s, 00:10 elapsed, 00:50 left\n"
    quiet = io.StringIO()
    with progress.bar(100, "steps", file=quiet, initial=100):
        pass  # a run resumed at its end: nothing counted, no line
    assert quiet.getvalue() == ""
