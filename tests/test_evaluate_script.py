"""examples/evaluate.py's command line: counts must be positive (a clear argparse error, not a crash later)."""

import pytest

from ._scripts import load_script

evaluate = load_script("examples/evaluate.py")


@pytest.mark.parametrize("flag", ["--prompts_per_concept", "--num_images_per_prompt", "--batch_size"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_non_positive_counts_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--target_concept", "red", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err
    assert ("must be at least 1" in err) if value != "two" else ("expected a whole number >= 1, got 'two'" in err)


def test_positive_counts_parse():
    args = evaluate.parse_args(["--target_concept", "red", "--prompts_per_concept", "1", "--batch_size", "4"])
    assert (args.prompts_per_concept, args.num_images_per_prompt, args.batch_size) == (1, 1, 4)
