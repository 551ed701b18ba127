"""CUDA graphs for decode (cuda_graphs.py): the padded sizes, the capture/replay wrapper
with the CPU's eager stand-in for a graph, and the setting, refused at start. No graph
has been captured on a GPU yet."""

from __future__ import annotations

import pytest
import torch

from loramux.core.config import Settings, add_settings_arguments, load_settings
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.cuda_graphs import (
    EagerCapture,
    PaddedDecode,
    capture_sizes,
    check_setting,
    padded_size,
)
from loramux.server.engine import Engine


def test_capture_sizes_are_1_2_4_then_multiples_of_8_up_to_the_batch() -> None:
    assert capture_sizes(32) == (1, 2, 4, 8, 16, 24, 32)
    assert capture_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert capture_sizes(3) == (1, 2, 3)
    assert capture_sizes(1) == (1,)
    assert len(capture_sizes(256)) == 3 + 32
    with pytest.raises(ValueError, match="--max-batch-size"):
        capture_sizes(0)


def test_a_batch_runs_as_the_smallest_size_that_holds_it() -> None:
    sizes = capture_sizes(32)
    assert [padded_size(r, sizes) for r in (1, 2, 3, 4, 5, 8, 9, 17, 25, 32)] == [
        1, 2, 4, 4, 8, 8, 16, 24, 32, 32,
    ]  # fmt: skip
    assert padded_size(33, sizes) is None  # larger than every graph: eager
    with pytest.raises(ValueError, match="at least one row"):
        padded_size(0, sizes)


def test_the_wrapper_pads_replays_and_returns_only_the_real_rows() -> None:
    """Each captured size runs over the first rows of one static buffer; rows past the
    batch hold the pad value, so a batch of 3 after one of 4 sees none of the 4th row."""
    seen: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:  # x [rows, 2] -> [rows, 2]
        seen.append(x.shape[0])
        return x * 2 + x.sum()

    decode = PaddedDecode(forward, torch.zeros(1, 2), capture_sizes(8), EagerCapture())
    assert seen == [8, 4, 2, 1]  # captured largest first
    seen.clear()
    four = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    assert torch.equal(decode(four), four * 2 + four.sum())
    three = torch.ones(3, 2)
    got = decode(three)
    assert seen == [4, 4]  # both ran as the captured size 4
    # padded with zeros, the 4th row of the batch before is gone: sum() over real rows
    assert torch.equal(got, three * 2 + three.sum())
    assert got.shape == (3, 2)
    nine = torch.ones(9, 2)
    assert torch.equal(decode(nine), nine * 2 + nine.sum()) and seen[-1] == 9  # eager


def test_the_setting_is_refused_off_cuda_naming_it(tiny_llama: ResolvedModel) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, ["engine"])
    settings = load_settings(parser.parse_args(["--cuda-graphs"]), environ={})
    assert settings.cuda_graphs and not Settings().cuda_graphs  # off unless asked
    with pytest.raises(
        ValueError, match="--cuda-graphs needs a CUDA device; this engine runs on cpu"
    ):
        Engine(
            load_base_model(tiny_llama, "nf4", "cpu"),
            load_tokenizer(tiny_llama),
            settings,
            tiny_llama,
        )


def test_on_cuda_it_is_refused_until_the_decode_step_can_be_captured() -> None:
    check_setting(False, torch.device("cuda"))  # off: nothing to say
    with pytest.raises(ValueError, match="cannot be captured yet"):
        check_setting(True, torch.device("cuda"))
