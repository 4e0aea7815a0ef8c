"""Every option of ``sam-diagnostics`` survives ``torchrun ... -m sam_diagnostics`` (issue 13):
none is equal to, or an abbreviation of, an option of torchrun's own parser."""

import argparse

import pytest

from sam_diagnostics.cli import RENAMED, build_parser, main


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    out = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= option_strings(sub)
    return out


def test_no_option_is_a_prefix_of_a_torchrun_option():
    run = pytest.importorskip("torch.distributed.run")
    theirs = option_strings(run.get_args_parser())
    ours = option_strings(build_parser()) - {"-h", "--help"}  # argparse's own, exact in both
    clashes = sorted((o, t) for o in ours for t in theirs if t.startswith(o))
    assert not clashes, clashes
    assert "--group-size" in ours and "--m" not in ours


def test_torchrun_parser_leaves_our_flags_to_us():
    run = pytest.importorskip("torch.distributed.run")
    args = run.get_args_parser().parse_args(
        ["--nproc_per_node", "2", "-m", "sam_diagnostics", "train", "--group-size", "1",
         "--optimizer", "sam", "--out", "x.zarr"])
    assert args.training_script_args[:3] == ["train", "--group-size", "1"]


def test_old_flag_name_still_works_outside_torchrun(capsys):
    assert RENAMED["--m"] == "--group-size"
    assert main(["train", "--m", "-3", "--out", "x.zarr"]) == 2  # parsed as group size -3
    err = capsys.readouterr().err
    assert "--m is now --group-size" in err and "m must be an integer >= 0, got -3" in err
