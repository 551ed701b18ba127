"""The CPU tier's host memory (host_memory.py): the pinned budget's arithmetic from given
(available, total) figures, the bookkeeping every device shares, and the store's use of
it, on the CPU. Pinning itself needs CUDA (torch's CPU build cannot pin): only the
allocation call differs there, and it has not run yet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from api_helpers import linear_shapes

from loramux.core.config import Settings
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.adapters import AdapterSpec, AdapterWeights, LinearShape, ModuleWeights
from loramux.server.engine import Engine
from loramux.server.host_memory import (
    HostTier,
    PinnedMemory,
    PlainMemory,
    adapters_fitting,
    host_adapter_bytes,
    make_host_tier,
    parse_meminfo,
    pinned_budget,
)
from loramux.server.synthetic import write_random_adapter

GIB = 1 << 30
MIB = 1 << 20
# One Llama-3-8B decoder layer's adaptable projections (q, k, v, o, gate, up, down).
LLAMA3_8B_LAYER = [
    LinearShape(4096, 4096),
    LinearShape(4096, 1024),
    LinearShape(4096, 1024),
    LinearShape(4096, 4096),
    LinearShape(4096, 14336),
    LinearShape(4096, 14336),
    LinearShape(14336, 4096),
]


def test_a_rank_16_llama3_8b_adapter_takes_80_mib_on_the_host() -> None:
    # 81,920 in + out features a layer, 32 layers, A and B in bf16
    assert host_adapter_bytes(LLAMA3_8B_LAYER * 32, 16) == 32 * 16 * 81_920 * 2 == 80 * MIB


def test_auto_pins_half_of_what_is_available() -> None:
    assert pinned_budget(200 * GIB, 256 * GIB, 0) == 100 * GIB
    assert pinned_budget(200 * GIB, 256 * GIB, 8 * GIB) == 8 * GIB


def test_how_many_adapters_fit_from_given_figures() -> None:
    """A 256 GiB host with 200 GiB available: auto pins 100 GiB, 1,280 rank-16 Llama-3-8B
    adapters of 80 MiB, more than the CPU tier's default 256; 8 GiB hold 102."""
    per_adapter = host_adapter_bytes(LLAMA3_8B_LAYER * 32, 16)
    auto = pinned_budget(200 * GIB, 256 * GIB, 0)
    assert adapters_fitting(auto, per_adapter, 10_000) == 1280
    assert adapters_fitting(auto, per_adapter, 256) == 256
    assert adapters_fitting(pinned_budget(200 * GIB, 256 * GIB, 8 * GIB), per_adapter, 256) == 102
    # rank 64: four times the bytes
    assert adapters_fitting(auto, host_adapter_bytes(LLAMA3_8B_LAYER * 32, 64), 10_000) == 320


def test_bad_figures_and_settings_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"--pinned-host-bytes 300 is more than the 200 bytes"):
        pinned_budget(200, 256, 300)
    with pytest.raises(ValueError, match="outside"):
        pinned_budget(300, 256, 0)
    with pytest.raises(ValueError, match="--pinned-host-bytes must be >= 0"):
        Settings(pinned_host_bytes=-1).validate()


def test_meminfo_is_read_in_bytes() -> None:
    text = "MemTotal:       263856052 kB\nMemFree:  1000 kB\nMemAvailable:   209715200 kB\n"
    assert parse_meminfo(text) == (209_715_200 * 1024, 263_856_052 * 1024)
    with pytest.raises(ValueError, match="MemAvailable"):
        parse_meminfo("MemTotal: 10 kB\n")


def test_the_placement_is_chosen_once_for_the_device() -> None:
    """CPU: plain memory, no budget; CUDA: pinned within the budget (only chosen here, no
    CUDA call is made)."""
    cpu = make_host_tier(torch.device("cpu"), 0)
    assert isinstance(cpu.memory, PlainMemory) and cpu.budget is None
    cuda = make_host_tier(torch.device("cuda"), 0, figures=(64 * GIB, 128 * GIB))
    assert isinstance(cuda.memory, PinnedMemory) and cuda.budget == 32 * GIB


def _weights(nbytes: int) -> AdapterWeights:
    """A plain LoRA of one [rank, 64] A and [64, rank] B in bf16 weighing `nbytes`."""
    rank = nbytes // (2 * 64 * 2)
    spec = AdapterSpec(rank, 16.0, False, ("q_proj",), nbytes, None, 16.0 / rank, 1)
    module = ModuleWeights(
        torch.zeros(rank, 64, dtype=torch.bfloat16),
        torch.zeros(rank, 64, dtype=torch.bfloat16).t(),
        16.0 / rank,
    )
    return AdapterWeights(spec, {"model.layers.0.self_attn.q_proj": module})


def test_the_budget_holds_what_fits_and_frees_on_release() -> None:
    tier = HostTier(PlainMemory(), budget=2 * 4096 + 100)
    first, second, third = (_weights(4096) for _ in range(3))
    assert first.nbytes == 4096
    held = [tier.place(w) for w in (first, second)]
    assert tier.place(third) is third  # over the budget: kept as it is, in plain memory
    use = tier.use()
    assert (use.held_bytes, use.held_adapters, use.overflow_adapters) == (8192, 2, 1)
    # plain memory holds the very tensors read (pinned memory would hold pinned copies)
    name = "model.layers.0.self_attn.q_proj"
    assert held[0] is not first and held[0].modules[name].lora_b is first.modules[name].lora_b
    tier.release(held[0])
    tier.release(third)
    assert tier.place(third) is not third  # room again
    assert tier.use().held_adapters == 2 and tier.use().overflow_adapters == 0


@pytest.fixture
def engine(tiny_llama: ResolvedModel) -> Iterator[Engine]:
    engine = Engine(
        load_base_model(tiny_llama, "nf4", "cpu"),
        load_tokenizer(tiny_llama),
        Settings(max_loaded_adapters=2, max_cpu_adapters=2, max_batch_size=4),
        tiny_llama,
    )
    yield engine
    engine.shutdown()


def test_the_store_places_loaded_adapters_and_releases_dropped_ones(
    engine: Engine, tiny_llama: ResolvedModel, tmp_path: Path
) -> None:
    """The adapter store sends every adapter it reads through its tier and releases it
    when it leaves CPU memory (unloaded, or pushed out of the CPU LRU): a budget of one
    adapter here, on the CPU's plain memory, shows the bookkeeping CUDA's pins follow."""
    shapes = linear_shapes(tiny_llama.path)
    for i in range(3):
        folder = write_random_adapter(tmp_path / f"a{i}", shapes, rank=8, seed=i)
        engine.adapters.register(f"a{i}", folder)
    assert engine.adapters.memory()["cpu_pinned_bytes"] == 0  # plain memory on the CPU
    engine.adapters.host = HostTier(PlainMemory(), budget=None)
    engine.adapters.load("a0")
    one = engine.adapters.memory()["cpu_bytes"]
    engine.adapters.host = tier = HostTier(PlainMemory(), budget=one)
    engine.adapters.unload("a0")
    engine.adapters.load("a1")
    engine.adapters.load("a2")
    use = tier.use()
    assert (use.held_adapters, use.overflow_adapters) == (1, 1)
    engine.adapters.unload("a1")  # the held one leaves: its bytes are free again
    engine.adapters.unload("a2")
    assert tier.use().held_adapters == 0 and tier.use().overflow_adapters == 0
    engine.adapters.load("a0")
    assert tier.use().held_adapters == 1
