"""The tiered adapter store: device slots <- CPU-memory LRU <- disk.

Three kinds of thread touch it, with one lock between them:

* API threads register, unregister, warm (`load`) and evict (`unload`) adapters;
* a loader thread reads adapter files from disk into CPU memory, so a cold adapter
  never stalls the batch that is already running;
* the engine loop thread alone writes device slots, between forward passes (the only
  time no layer is reading them), when it admits a request (`acquire`) or services
  warm/evict requests (`service`).

An adapter with requests in flight (refcount > 0) is never evicted; pinned adapters are
never evicted either. Concurrent requests for the same cold adapter cause one load.
A load that fails (an I/O error, files changed) fails the requests waiting for it and
those that come within a backoff (1 s, doubling to 60 s); the first request after it
tries again, so a passing error does not break the adapter until someone loads it by hand.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from loramux.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    LoramuxError,
    NotFound,
    ResourceExhausted,
)
from loramux.server.adapters import (
    AdapterSpec,
    AdapterWeights,
    EmbeddingShape,
    LinearShape,
    inspect_adapter,
    read_config,
)
from loramux.server.composition import (
    WeightedAdapter,
    compose,
    composite_id,
    composite_spec,
    not_composable,
)
from loramux.server.host_memory import HostTier, PlainMemory
from loramux.server.lora import MultiLoraLinear, SlotTable, lora_groups
from loramux.server.lora.dora import dora_scales
from loramux.server.lora.experts import expert_weights_of
from loramux.server.lora.tokens import TokenTable
from loramux.server.slot_copies import SlotCopies, SyncCopies
from loramux.server.threads import one_thread, use_one_thread

if TYPE_CHECKING:
    from loramux.server.adapters import ExpertShape
    from loramux.server.lora.experts import MultiLoraExperts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterStats:
    hits: int = 0  # requests that found the adapter in a device slot
    misses: int = 0  # requests that had to wait for a load
    loads: int = 0  # disk -> CPU loads
    evictions: int = 0  # device slot evictions
    load_seconds_total: float = 0.0
    last_load_seconds: float = 0.0
    state: str = "stored"


@dataclass
class _Entry:
    adapter_id: str
    path: Path
    spec: AdapterSpec
    pinned: bool = False
    refcount: int = 0
    slot: int | None = None
    cpu: AdapterWeights | None = None
    loading: bool = False
    load_error: LoramuxError | None = None  # the last load failed; kept until retry_at
    failures: int = 0  # loads failed in a row (sets the backoff)
    retry_at: float = 0.0  # when a request may try a failed load again
    deleted: bool = False
    want_device: bool = False  # a `load()` call is waiting for a slot
    want_evict: bool = False  # an `unload()` call is waiting for eviction
    generation: int = 0  # bumped when a deleted entry is stored again (stale loads are dropped)
    parts: tuple[WeightedAdapter, ...] = ()  # a composition of these adapters (else a folder)
    incarnation: int = 0  # unique per store over entries and revivals (names its KV identity)
    # (the folder read, why it cannot be composed: DoRA, trainable tokens; None) once asked
    refusal: tuple[Path, str | None] | None = None
    stats: AdapterStats = field(default_factory=AdapterStats)

    @property
    def state(self) -> str:
        if self.slot is not None:
            return "device"
        return "cpu" if self.cpu is not None else "stored"


class AdapterStore:
    def __init__(
        self,
        layers: Mapping[str, MultiLoraLinear],
        base_linears: Mapping[str, LinearShape],
        max_loaded: int,
        max_cpu: int,
        max_rank: int,
        wake_engine: Callable[[], None],
        table: SlotTable | None = None,
        *,
        module_names: Sequence[str] | None = None,
        experts: Mapping[str, MultiLoraExperts] | None = None,
        base_experts: Mapping[str, ExpertShape] | None = None,
        tokens: TokenTable | None = None,
        embedding: EmbeddingShape | None = None,
        retry_backoff: tuple[float, float] = (1.0, 60.0),
        clock: Callable[[], float] = time.monotonic,
        host: HostTier | None = None,
        copies: SlotCopies | None = None,
    ) -> None:
        self._layers = layers
        self._bases = {name: layer.base for name, layer in layers.items()}  # for DoRA's norms
        self._groups = lora_groups(dict(layers))
        # Each group with its members' layer names: an install writes a group at a time.
        members: dict[int, list[tuple[int, str]]] = {id(g): [] for g in self._groups}
        for name, layer in layers.items():
            members[id(layer.group)].append((layer.member, name))
        self._group_members = [(g, members[id(g)]) for g in self._groups]
        # The layers' shared slot placement (rank classes); its own when there are none.
        self._table = table if table is not None else SlotTable(max_loaded + 1)
        self._base_linears = base_linears
        self._module_names = list(module_names) if module_names is not None else None
        # The fused MoE experts modules (lora/experts.py) and the parameters adapters may
        # target in them (`target_parameters`); none on a dense base.
        self._experts = dict(experts or {})
        self._base_experts = dict(base_experts or {})
        # Trainable tokens' rows per slot, and the embedding they are checked against
        # (None: adapters with trainable tokens are refused)
        self._tokens = tokens
        self._embedding = embedding if tokens is not None else None
        self._retry_backoff = retry_backoff  # (first wait, longest wait) after a failed load
        # The CPU tier's memory (pinned on CUDA, host_memory.py) and where installs run
        # (a side stream on CUDA, slot_copies.py): each chosen once, for the device.
        self.host = host if host is not None else HostTier(PlainMemory(), None)
        self.copies: SlotCopies = copies if copies is not None else SyncCopies()
        self._clock = clock
        self.max_loaded = max_loaded
        self.max_cpu = max_cpu
        self.max_rank = max_rank
        self._wake_engine = wake_engine
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # any entry changed state
        self._entries: dict[str, _Entry] = {}
        self._incarnations = itertools.count(1)
        self._free_slots = list(range(max_loaded, 0, -1))  # slot 0 is the zero "base only" slot
        self._device_lru: OrderedDict[str, None] = OrderedDict()
        self._cpu_lru: OrderedDict[str, None] = OrderedDict()
        self._composites: OrderedDict[str, None] = OrderedDict()  # least recently asked first
        self._load_queue: queue.Queue[str | None] = queue.Queue()
        self._loader = threading.Thread(target=self._load_loop, name="adapter-loader", daemon=True)
        self._loader.start()

    # ---- API side ----
    def validate(self, path: Path) -> AdapterSpec:
        with one_thread():  # called on gRPC handler threads: see threads.py
            return self._inspect(path).spec

    def _inspect(self, path: Path) -> AdapterWeights:
        return inspect_adapter(
            path,
            self._base_linears,
            self.max_rank,
            module_names=self._module_names,
            load=True,
            base_experts=self._base_experts,
            embedding=self._embedding,
        )

    def register(
        self, adapter_id: str, path: Path, *, spec: AdapterSpec | None = None
    ) -> AdapterSpec:
        if spec is None:
            spec = self.validate(path)
        with self._lock:
            old = self._entries.get(adapter_id)
            if old is not None and old.deleted:
                # Deleted while requests still hold it, and stored again with the same files
                # (same id: same owner, name and content). Revive the entry instead of replacing
                # it, so those requests release the slot they hold, not the new entry's.
                old.deleted, old.load_error, old.path, old.spec = False, None, Path(path), spec
                old.generation += 1
                old.incarnation = next(self._incarnations)
                return spec
            if old is not None:
                if old.path == Path(path):
                    return old.spec
                raise FailedPrecondition("adapter", f"{adapter_id} is already registered")
            self._entries[adapter_id] = _Entry(
                adapter_id=adapter_id,
                path=Path(path),
                spec=spec,
                incarnation=next(self._incarnations),
            )
        return spec

    def unregister(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._get(adapter_id)
            entry.deleted = True
            entry.want_evict = True
            for other in self._entries.values():  # compositions of it go with it
                if any(p.adapter_id == adapter_id for p in other.parts):
                    other.deleted = True
                    other.want_evict = True
        self._wake_engine()

    def weighted(self, parts: Sequence[WeightedAdapter], field: str = "adapters") -> str | None:
        """The engine id serving these weighted adapters: None (the base model) when every
        weight is 0, the adapter itself alone at weight 1, else a composition (of no DoRA
        adapter nor one with trainable tokens: `field`[i].name names one)."""
        with self._lock:
            entries = [self._get(part.adapter_id) for part in parts]  # NotFound first
        live = [p for p in parts if p.weight != 0]
        if not live:
            return None
        if len(live) == 1 and live[0].weight == 1.0:
            return live[0].adapter_id
        for i, (part, entry) in enumerate(zip(parts, entries, strict=True)):
            refusal = self._refusal(entry) if part.weight != 0 else None
            if refusal is not None:
                raise InvalidArgument(f"{field}[{i}].name", refusal)
        return self.compose(live)

    @staticmethod
    def _refusal(entry: _Entry) -> str | None:
        """Why the entry's adapter cannot be composed, from its adapter_config.json (read
        once per entry: a registry record does not say). Unreadable files: None here, the
        load says why."""
        if entry.parts:
            return None
        if entry.refusal is None or entry.refusal[0] != entry.path:
            try:
                refusal = not_composable(read_config(entry.path))
            except LoramuxError:
                return None
            entry.refusal = (entry.path, refusal)
        return entry.refusal[1]

    def compose(self, parts: Sequence[WeightedAdapter]) -> str:
        """The engine id of a slot serving the weighted sum of these adapters (see
        composition.py), registered on first use and cached like an adapter; at most
        `max_cpu` compositions are kept, the least recently asked unused ones dropped."""
        with self._lock:
            specs = [self._get(p.adapter_id).spec for p in parts]
            adapter_id = composite_id(parts)
            entry = self._entries.get(adapter_id)
            if entry is not None and entry.deleted:
                # Dropped with a part that has since been stored again: serve it afresh.
                entry.deleted, entry.want_evict, entry.load_error = False, False, None
                entry.generation += 1
                entry.incarnation = next(self._incarnations)
            elif entry is None:
                self._drop_unused_composites(self.max_cpu - 1)
                self._entries[adapter_id] = _Entry(
                    adapter_id=adapter_id,
                    path=Path(),
                    spec=composite_spec(specs),
                    parts=tuple(parts),
                    incarnation=next(self._incarnations),
                )
            self._composites[adapter_id] = None
            self._composites.move_to_end(adapter_id)
            return adapter_id

    def _drop_unused_composites(self, keep: int) -> None:
        for adapter_id in list(self._composites):
            if len(self._composites) <= keep:
                return
            entry = self._entries.get(adapter_id)
            if entry is None or entry.deleted:
                del self._composites[adapter_id]
            elif (
                entry.refcount == 0
                and entry.slot is None
                and not entry.loading
                and not entry.want_device
            ):
                del self._composites[adapter_id], self._entries[adapter_id]
                self._drop_cpu(entry)
                self._cpu_lru.pop(adapter_id, None)
        if len(self._composites) > keep:
            raise ResourceExhausted(
                "adapters", f"{len(self._composites)} composed adapters are in use; try later"
            )

    def kv_identity(self, adapter_id: str) -> bytes:
        """Names the adapter's effect on keys and values, for the prefix cache: the same
        files stored again after a delete, or other files under the same id, get a new one."""
        with self._lock:
            entry = self._get(adapter_id)
            return f"adapter\0{adapter_id}\0{entry.incarnation}".encode()

    def __contains__(self, adapter_id: object) -> bool:
        with self._lock:
            entry = self._entries.get(adapter_id)  # type: ignore[call-overload]
            return entry is not None and not entry.deleted

    def spec(self, adapter_id: str) -> AdapterSpec:
        with self._lock:
            return self._get(adapter_id).spec

    def state(self, adapter_id: str) -> str:
        with self._lock:
            return self._get(adapter_id).state

    def pin(self, adapter_id: str, pinned: bool = True) -> None:
        with self._lock:
            self._get(adapter_id).pinned = pinned

    def load(self, adapter_id: str, timeout: float = 120.0) -> None:
        """Warm an adapter into a device slot; returns once it is resident."""
        entry = self._mark(adapter_id, want_device=True)
        try:
            self._wait_for(entry, lambda: entry.slot is not None, timeout, "load")
        finally:
            with self._lock:
                entry.want_device = False  # from now on an eviction candidate like any other

    def unload(self, adapter_id: str, timeout: float = 120.0) -> None:
        """Evict from device and CPU memory; waits for in-flight requests to finish first."""
        with self._lock:
            entry = self._get(adapter_id)
            if entry.state == "stored" and not entry.loading:
                return  # nothing resident: a lingering evict flag would undo the next load
        entry = self._mark(adapter_id, want_evict=True)
        self._wait_for(entry, lambda: entry.state == "stored", timeout, "unload")

    def stats(self) -> dict[str, AdapterStats]:
        with self._lock:
            return {
                k: replace(e.stats, state=e.state)
                for k, e in self._entries.items()
                if not e.deleted
            }

    def totals(self) -> AdapterStats:
        with self._lock:
            entries = list(self._entries.values())
        return AdapterStats(
            hits=sum(e.stats.hits for e in entries),
            misses=sum(e.stats.misses for e in entries),
            loads=sum(e.stats.loads for e in entries),
            evictions=sum(e.stats.evictions for e in entries),
            load_seconds_total=sum(e.stats.load_seconds_total for e in entries),
            last_load_seconds=max((e.stats.last_load_seconds for e in entries), default=0.0),
            state="",
        )

    def memory(self) -> dict[str, int]:
        """Bytes of adapter weights held in CPU memory and in device slots."""
        with self._lock:
            cpu = sum(e.cpu.nbytes for e in self._entries.values() if e.cpu is not None)
            used = self.max_loaded - len(self._free_slots)
            # Bytes of one slot in each rank class stack; the rank classes of used slots.
            per_slot = {
                width: sum(g.stacks[width].nbytes // capacity for g in self._groups)
                for width, capacity in self._table.capacities().items()
            }
            dora_row = sum(4 * sum(g.outs) for g in self._groups)  # one slot's g, float32
            used_bytes = 0
            for slot in range(1, self.max_loaded + 1):
                placement = self._table.placement(slot)
                if placement is not None:
                    used_bytes += per_slot[placement.width]
                    used_bytes += dora_row if self._table.dora_index(slot) else 0
                    used_bytes += self._tokens.nbytes(slot) if self._tokens is not None else 0
                # expert LoRA: a slot takes its share of a stack only where it holds weights
                used_bytes += sum(
                    e.slot_nbytes for e in self._experts.values() if slot in e.occupied
                )
            allocated = sum(g.nbytes for g in self._groups)
            allocated += sum(e.nbytes for e in self._experts.values())
        host = self.host.use()
        return {
            "cpu_bytes": cpu,
            "cpu_pinned_bytes": host.held_bytes if host.memory == "pinned" else 0,
            "device_slot_bytes": allocated,  # allocated for the rank class stacks in use
            "device_used_bytes": used_bytes,
            "device_slots_used": used,
        }

    @property
    def copies_pending(self) -> bool:
        """Whether an install into a device slot is not done yet (never on the CPU)."""
        with self._lock:
            return self.copies.pending

    def wait_for_copies(self) -> None:
        """Block until every pending install is done: for the engine when nothing else
        runs (slot_copies.py)."""
        self.copies.wait_on_host()

    def close(self) -> None:
        self._load_queue.put(None)

    # ---- engine-loop side (the only writer of device slots) ----
    def acquire(self, adapter_id: str, first_attempt: bool) -> int | None:
        """A slot holding the adapter for one request, or None while it is being made resident."""
        with self._lock:
            entry = self._get(adapter_id)
            if entry.load_error is not None:
                if self._clock() < entry.retry_at:
                    raise entry.load_error  # fail fast while backing off
                entry.load_error = None  # an I/O error may have passed: this request retries
            if entry.slot is None and entry.cpu is not None:
                self._install(entry)
            if entry.slot is not None and not self.copies.ready(entry.slot):
                # Installed, but its copy is still running (a side stream on CUDA): the
                # slot is not handed out before it is done; the request stays queued.
                if first_attempt:
                    entry.stats = replace(entry.stats, misses=entry.stats.misses + 1)
                return None
            if entry.slot is not None:
                self.copies.use(entry.slot)  # the compute stream after the copy
                entry.refcount += 1
                if first_attempt:
                    entry.stats = replace(entry.stats, hits=entry.stats.hits + 1)
                self._device_lru.move_to_end(adapter_id)
                return entry.slot
            if first_attempt:
                entry.stats = replace(entry.stats, misses=entry.stats.misses + 1)
            self._schedule_load(entry)
            return None

    def release(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries[adapter_id]
            entry.refcount -= 1
            if entry.refcount == 0 and (entry.want_evict or entry.deleted):
                self._evict(entry)

    def service(self) -> None:
        """Carry out pending warm and evict requests (called by the engine between steps)."""
        with self._lock:
            for entry in list(self._entries.values()):
                if entry.want_evict and entry.refcount == 0:
                    self._evict(entry)
                elif entry.want_device and entry.slot is None:
                    if entry.load_error is not None:
                        self._notify(entry)
                    elif entry.cpu is None:
                        self._schedule_load(entry)
                    else:
                        self._install(entry)  # notifies; `load()` clears want_device

    @property
    def loading(self) -> bool:
        with self._lock:
            return any(e.loading for e in self._entries.values())

    # ---- internals (lock held) ----
    def _get(self, adapter_id: str) -> _Entry:
        entry = self._entries.get(adapter_id)
        if entry is None or entry.deleted:
            raise NotFound("adapter", f"no adapter {adapter_id!r}")
        return entry

    def _mark(self, adapter_id: str, **flags: bool) -> _Entry:
        with self._lock:
            entry = self._get(adapter_id)
            for name, value in flags.items():
                setattr(entry, name, value)
            if flags.get("want_device"):
                entry.load_error = None  # an explicit load retries a failed one
        self._wake_engine()
        return entry

    def _wait_for(self, entry: _Entry, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done():
                if entry.load_error is not None:
                    raise entry.load_error
                if entry.deleted and what == "load":
                    raise NotFound("adapter", f"{entry.adapter_id} was deleted")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResourceExhausted(
                        "adapter", f"{what} of {entry.adapter_id} did not finish in {timeout:.0f}s"
                    )
                self._changed.wait(left)

    def _notify(self, entry: _Entry) -> None:
        with self._changed:
            self._changed.notify_all()

    def _schedule_load(self, entry: _Entry) -> None:
        if not entry.loading and entry.cpu is None:
            entry.loading = True
            self._load_queue.put(entry.adapter_id)

    def _install(self, entry: _Entry) -> None:
        """Copy CPU weights into a free (or freshly evicted) device slot, if one can be had."""
        assert entry.cpu is not None
        if not self._free_slots:
            victim = next(
                (
                    self._entries[k]
                    for k in self._device_lru
                    # Not one that a `load()` caller has not yet seen resident: evicted
                    # at once by a busier adapter, the caller would wait for nothing.
                    if self._entries[k].refcount == 0
                    and not self._entries[k].pinned
                    and not self._entries[k].want_device
                ),
                None,
            )
            if victim is None:
                return  # every slot serves a running request: wait for one to finish
            self._release_slot(victim)
        slot = self._free_slots.pop()
        # its rank class (no padding to the widest), and a DoRA row when it has magnitudes
        self._table.place(slot, entry.spec.rank, dora=entry.cpu.uses_dora)
        self._fit_groups()
        with one_thread():  # hundreds of 10-400 KB copies: OpenMP fork/join costs more
            with self.copies.copying(slot):  # on CUDA a side stream: slot_copies.py
                for group, names in self._group_members:
                    group.install(slot, {m: entry.cpu.modules.get(name) for m, name in names})
            # Expert stacks widen and token rows are allocated as they are installed:
            # on the compute stream, ordered with the steps as before.
            for name, experts in self._experts.items():
                weights = expert_weights_of(entry.cpu.experts, name)
                if weights:
                    experts.install(slot, weights)
            if self._tokens is not None:
                self._tokens.install(slot, entry.cpu.tokens)
        entry.slot = slot
        self._device_lru[entry.adapter_id] = None
        self._cpu_lru.move_to_end(entry.adapter_id) if entry.adapter_id in self._cpu_lru else None
        self._notify(entry)

    def _release_slot(self, entry: _Entry) -> None:
        if entry.slot is None:
            return
        with one_thread():
            for group in self._groups:
                group.forget(entry.slot)
            for experts in self._experts.values():
                experts.forget(entry.slot)
            if self._tokens is not None:
                self._tokens.forget(entry.slot)
            self._table.remove(entry.slot)
            self._fit_groups()  # an emptied rank class gives its memory back
        self._free_slots.append(entry.slot)
        entry.slot = None
        self._device_lru.pop(entry.adapter_id, None)
        entry.stats = replace(entry.stats, evictions=entry.stats.evictions + 1)

    def _fit_groups(self) -> None:
        """Resize the groups' stacks to the slot table on the compute stream, after every
        pending install when a stack is replaced (its rows are copied into the new one)."""
        if any(group.needs_resize() for group in self._groups):
            self.copies.settle()
        for group in self._groups:
            group.fit()

    def _drop_cpu(self, entry: _Entry) -> None:
        if entry.cpu is not None:
            self.host.release(entry.cpu)
        entry.cpu = None

    def _evict(self, entry: _Entry) -> None:
        self._release_slot(entry)
        self._drop_cpu(entry)
        self._cpu_lru.pop(entry.adapter_id, None)
        entry.want_evict = False
        if entry.deleted:
            self._entries.pop(entry.adapter_id, None)
            self._composites.pop(entry.adapter_id, None)
        self._notify(entry)

    # ---- loader thread ----
    def _load_loop(self) -> None:
        use_one_thread()  # the engine thread alone runs parallel torch ops (threads.py)
        while (adapter_id := self._load_queue.get()) is not None:
            with self._lock:
                entry = self._entries.get(adapter_id)
                path = entry.path if entry is not None else None
                generation = entry.generation if entry is not None else 0
            if entry is None or path is None:
                continue
            started = time.perf_counter()
            weights: AdapterWeights | None = None
            error: LoramuxError | None = None
            try:
                parts = entry.parts
                weights = self._load_composite(parts) if parts else self._inspect(path)
                weights = dora_scales(weights, self._bases)  # DoRA's g: once, here
                weights = self.host.place(weights)  # pinned on CUDA, within its budget
            except Exception as exc:  # checked when registered: the files changed since, or I/O
                log.warning("adapter %s failed to load from %s: %s", adapter_id, path, exc)
                # Not the caller's argument but the adapter's state; and no server paths.
                reason = str(exc) if entry.parts else str(exc).replace(str(path), "its folder")
                error = FailedPrecondition("adapter", f"{adapter_id} cannot be loaded: {reason}")
            seconds = time.perf_counter() - started
            with self._lock:
                entry.loading = False
                if entry.deleted or entry.generation != generation:
                    # Deleted meanwhile (its files may be gone: not an error of the adapter),
                    # or deleted and stored again: a waiting request schedules a fresh load.
                    if weights is not None:
                        self.host.release(weights)
                elif error is not None:
                    first, longest = self._retry_backoff
                    wait = min(first * 2**entry.failures, longest)
                    entry.failures += 1
                    entry.retry_at = self._clock() + wait
                    entry.load_error = FailedPrecondition(
                        "adapter", f"{error.message}; retried after {wait:g} s"
                    )
                else:
                    entry.failures = 0
                    entry.cpu = weights
                    self._cpu_lru[adapter_id] = None
                    entry.stats = replace(
                        entry.stats,
                        loads=entry.stats.loads + 1,
                        load_seconds_total=entry.stats.load_seconds_total + seconds,
                        last_load_seconds=seconds,
                    )
                    self._trim_cpu()
            self._notify(entry)
            self._wake_engine()

    def _load_composite(self, parts: tuple[WeightedAdapter, ...]) -> AdapterWeights:
        """The parts' weights (from CPU memory, else from disk) composed into one."""
        loaded = []
        for part in parts:
            with self._lock:
                entry = self._entries.get(part.adapter_id)
                if entry is None or entry.deleted:
                    raise FileNotFoundError(f"its part {part.adapter_id} was deleted")
                cpu, path = entry.cpu, entry.path
            if cpu is None:
                cpu = self._inspect(path)
            loaded.append((cpu, part.weight))
        return compose(loaded)

    def _trim_cpu(self) -> None:
        while len(self._cpu_lru) > self.max_cpu:
            for adapter_id in self._cpu_lru:
                entry = self._entries[adapter_id]
                if entry.refcount == 0 and not entry.pinned and not entry.want_device:
                    self._drop_cpu(entry)
                    del self._cpu_lru[adapter_id]
                    break
            else:
                return
