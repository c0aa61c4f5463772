"""The progress bar: drawn on a terminal only (a real pseudo-terminal here), totals right, silent in pipes."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys

import pytest
import torch

from optstate.progress import Progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen_lines(output: str) -> list[str]:
    """The lines a terminal is left showing: each line's text after its last carriage return or line erase."""
    lines = []
    for line in output.replace("\r\n", "\n").split("\n"):
        line = re.split(r"\r|\x1b\[2K", line)[-1]
        lines.append(ANSI.sub("", line).strip())
    return [line for line in lines if line]


@pytest.fixture
def ckpt(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.ones(1, 64)).sum().backward()
    opt.step()
    torch.save({"optimizer": opt.state_dict(), "model": net.state_dict()}, tmp_path / "c.pt")
    return tmp_path / "c.pt"


def convert_command(*args: str) -> list[str]:
    """``optstate convert ARGS`` in a fresh process, with the bar shown from the first tensor (no delay)."""
    script = (
        "import sys, optstate.progress as p; p.SHOW_AFTER_S = 0; from optstate.cli import main; "
        "raise SystemExit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", script, "convert", *args]


def run_on_a_terminal(command: list[str]) -> tuple[int, str]:
    """Run ``command`` with stdout and stderr on a pseudo-terminal; its exit code and all it wrote there."""
    parent, child = pty.openpty()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    return process.wait(timeout=120), b"".join(chunks).decode(errors="replace")


# Writers write what their format holds: the torch one adds each parameter's step, beyond the estimate.
@pytest.mark.parametrize(("dst", "written"), [("s.safetensors", 12), ("back.pt", 16)])
def test_the_bar_appears_on_a_terminal_and_ends_at_the_total_once(ckpt, tmp_path, dst, written):
    code, output = run_on_a_terminal(convert_command(str(ckpt), str(tmp_path / dst)))
    assert code == 0, output
    bars = [line for line in screen_lines(output) if line.startswith("converting")]
    assert len(bars) == 1, output  # the finished bar stays on screen once, not twice
    done, total = re.search(r"([\d.]+)/([\d.]+) kB", bars[0]).groups()
    assert "100%" in bars[0] and done == total, bars[0]
    tensors = int(re.search(r"(\d+) tensors", bars[0]).group(1))
    assert tensors == written  # 4 parameters' weights, exp_avg, exp_avg_sq (and steps): one call per tensor


def test_quiet_on_a_terminal_draws_nothing(ckpt, tmp_path):
    code, output = run_on_a_terminal(convert_command("--quiet", str(ckpt), str(tmp_path / "s.safetensors")))
    assert code == 0 and "converting" not in output and "\x1b[" not in output, output


def test_nothing_is_drawn_in_a_pipe(ckpt, tmp_path):
    run = subprocess.run(convert_command(str(ckpt), str(tmp_path / "s.safetensors")), capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.count("\n") == 1 and "\x1b" not in run.stdout


def test_a_writer_that_writes_more_than_estimated_never_passes_100_percent():
    bar = Progress(total_bytes=1000, total_tensors=1, stream=Terminal(), delay=0)
    for _ in range(3):
        bar(1000)
    assert bar.line() == "3 tensors  3.0 KB/3.0 KB  100%"  # not "3/1 tensors", not 300%
    bar.close()
    bar.close()  # a second close draws nothing more
    finished = [line for line in screen_lines(bar.stream.getvalue()) if line.startswith("converting")]
    assert len(finished) == 1 and "100%" in finished[0] and "3 tensors" in finished[0]


def test_a_failed_conversion_stops_where_it_was():
    bar = Progress(total_bytes=4000, total_tensors=4, stream=Terminal(), delay=0)
    bar(1000)
    bar.close(finished=False)
    assert bar.line() == "1 tensors  1.0 KB/4.0 KB  25%"
    assert "100%" not in bar.stream.getvalue()


def test_no_time_left_before_there_is_a_rate():
    bar = Progress(total_bytes=10**9, total_tensors=2, stream=Terminal(), delay=0)
    bar(1)
    bar.close(finished=False)
    assert " s left" not in bar.stream.getvalue() and "-:--:--" in bar.stream.getvalue()


def test_silent_off_a_terminal_and_before_the_delay():
    quiet = Progress(1000, 1, stream=io.StringIO(), delay=0)
    waiting = Progress(1000, 1, stream=Terminal(), delay=60)
    for bar in (quiet, waiting):
        bar(1000)
        bar.close()
        assert bar.stream.getvalue() == "" and not bar.shown


def test_a_burst_of_tensors_gives_the_mean_rate_not_a_wild_one():
    # Orbax finishes many tensors at once, verify a chunk's checks: microseconds apart. Rich's own rate
    # over its last updates read such a burst as hundreds of GB/s with a second left.
    bar = Progress(total_bytes=32 * 10**6, total_tensors=32, stream=Terminal(), delay=0)
    bar.start -= 2.0  # the work began two seconds ago
    for _ in range(16):
        bar(10**6)
    bar.close(finished=False)
    last = screen_lines(bar.stream.getvalue())[-1]
    rate, left = re.search(r"([\d.]+ [kMG]?B/s) (\d+:\d\d:\d\d)", last).groups()
    assert rate in ("8.0 MB/s", "7.9 MB/s") and left == "0:00:03", last  # 16 MB in 2 s; 16 MB to go
