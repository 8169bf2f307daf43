"""World-1 ShardedEngramTable against nn.Embedding(sparse=True) + torch.optim.SparseAdam."""

from __future__ import annotations

import os

import pytest
import torch

from tests import kernel_cache_dir

os.environ.setdefault("TORCH_EXTENSIONS_DIR", kernel_cache_dir())

from engram_train.memory import ShardedEngramTable, TablePrefetcher, UniqueIds, bytes_per_row  # noqa: E402
from engram_train.memory.sharding import RowSharding  # noqa: E402
from engram_train.memory.table import init_rows  # noqa: E402
from engram_train.memory.table_files import load_table, snapshot_table, write_table_files  # noqa: E402
from tests.table_steps import train_table  # noqa: E402

N, D, LR = 1000, 8, 1e-2


def _batches(steps: int, seed: int = 0, high: int = 300):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, high, (4, 50), generator=gen)  # many duplicates, rows >= high untouched
        yield ids, torch.randn(4, 50, D, generator=gen)


def _train(table: ShardedEngramTable, steps: int = 5, prefetch: bool = False) -> None:
    train_table(table, _batches(steps), lr=LR, prefetch=prefetch)


def _reference(steps: int = 5, seed: int = 3):
    emb = torch.nn.Embedding(N, D, sparse=True)
    emb.weight.data.copy_(init_rows(0, N, D, 0.02, seed, torch.float32))
    opt = torch.optim.SparseAdam(emb.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    for ids, w in _batches(steps):
        opt.zero_grad()
        (emb(ids) * w).sum().backward()
        opt.step()
    return emb.weight.detach(), opt.state[emb.weight]


def _dense_state(table: ShardedEngramTable, name: str) -> torch.Tensor:
    touched, state = table.optim.export_state()
    out = torch.zeros((table.end - table.start, *state[name].shape[1:]))
    out[touched] = state[name]
    return out


@pytest.mark.parametrize("use_cpu_adam", [False, True], ids=["torch_adam", "cpu_adam"])
def test_five_steps_match_sparse_adam(use_cpu_adam):
    table = ShardedEngramTable(N, D, seed=3, use_cpu_adam=use_cpu_adam)
    _train(table)
    weight, state = _reference()
    torch.testing.assert_close(table.rows, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(_dense_state(table, "exp_avg"), state["exp_avg"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_dense_state(table, "exp_avg_sq"), state["exp_avg_sq"], atol=1e-6, rtol=1e-6)
    # Rows never looked up have no optimizer state at all.
    touched = torch.unique(torch.cat([ids.flatten() for ids, _ in _batches(5)]))
    assert table.optim.num_slots == touched.numel() and (table.optim.slot[300:] == -1).all()


CPU_ADAM_BUILD_FAILS_TWICE = """
import os, pathlib, shutil, warnings
from engram_train.memory.table import ShardedEngramTable
extensions = pathlib.Path(os.environ["TORCH_EXTENSIONS_DIR"])
for attempt in range(2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = ShardedEngramTable(64, 8, seed=1, use_cpu_adam=True)
    assert type(table.optim).__name__ == "TorchAdam", table.optim
    assert any("cpu_adam unavailable" in str(w.message) for w in caught), [str(w.message) for w in caught]
    print(attempt, "build folders:", sorted(p.name for p in extensions.iterdir()))
    shutil.rmtree(extensions)
    extensions.mkdir()
"""


def test_a_failed_cpu_adam_build_falls_back_to_torch_adam_and_is_not_retried(tmp_path):
    """No working C++ compiler (CXX=/bin/false) and an empty build cache: the first table tries the real DeepSpeed
    build, warns and uses torch Adam; the second table of the process falls back without starting a build again."""
    import subprocess
    import sys

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": "/bin/false", "PYTHONWARNINGS": "ignore"}
    (tmp_path / "ext").mkdir()
    result = subprocess.run([sys.executable, "-c", CPU_ADAM_BUILD_FAILS_TWICE], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 build folders: ['cpu_adam']" in result.stdout, result.stdout  # the first table did try to build
    assert "1 build folders: []" in result.stdout, result.stdout


def test_cpu_adam_kernel_matches_torch_path():
    tables = [ShardedEngramTable(N, D, seed=1, use_cpu_adam=flag) for flag in (True, False)]
    assert type(tables[0].optim).__name__ == "CpuAdam", "DeepSpeed cpu_adam did not load"
    for t in tables:
        _train(t, steps=3)
    torch.testing.assert_close(tables[0].rows, tables[1].rows, atol=1e-7, rtol=0)


def test_prefetch_gives_identical_rows():
    a, b = ShardedEngramTable(N, D, seed=3, use_cpu_adam=False), ShardedEngramTable(N, D, seed=3, use_cpu_adam=False)
    _train(a)
    _train(b, prefetch=True)
    assert torch.equal(a.rows, b.rows)


def test_prefetch_submitted_before_step_is_not_stale():
    table = ShardedEngramTable(N, D, seed=3, use_cpu_adam=False)
    ids = torch.arange(10)
    rows = table.lookup(ids)
    rows.sum().backward()
    table.accumulate_grad(ids, rows.grad)
    prefetcher = TablePrefetcher(table)
    prefetcher.submit(ids)  # races with the update below
    table.step(LR)
    assert torch.equal(prefetcher.result(), table.lookup(ids))


def test_duplicates_and_accumulation_sum_grads():
    table = ShardedEngramTable(N, D, optimizer="rowwise_adagrad", use_cpu_adam=False)
    ids = torch.tensor([5, 5, 7])
    for _ in range(2):  # two micro-batches
        rows = table.lookup(ids)
        rows.sum().backward()
        table.accumulate_grad(ids, rows.grad)
    assert table.grad_norm_sq() == pytest.approx(D * (4**2) + D * (2**2))
    before = table.rows.clone()
    table.step(LR, grad_scale=0.5)
    changed = (table.rows != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [5, 7]
    assert table.grad_norm_sq() == 0.0


@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adam", "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_optimizers_and_dtypes_learn_and_report_bytes(optimizer, dtype):
    table = ShardedEngramTable(N, D, optimizer=optimizer, table_dtype=dtype, use_cpu_adam=False)
    target = torch.ones(20, D)
    ids = torch.arange(20)
    losses = []
    for _ in range(20):
        rows = table.lookup(ids)
        assert rows.dtype == table.dtype == getattr(torch, dtype) and rows.requires_grad  # shipped as stored
        loss = (rows - target).square().mean()
        loss.backward()
        table.accumulate_grad(ids, rows.grad)
        table.step(0.05)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    stats = table.stats()
    row_bytes = D * (4 if dtype == "float32" else 2)
    state = {"adam": 2 * D * 4, "rowwise_adam": D * 4 + 4, "rowwise_adagrad": 4}[optimizer]
    assert stats["bytes_per_row"] == bytes_per_row(optimizer, dtype, D) == row_bytes + state + 4
    assert stats["touched_rows"] == 20 and stats["rows"] == N


def test_init_is_independent_of_world_size():
    full = init_rows(0, 200_000, 2, 0.02, 7, torch.float32)
    sharding = RowSharding(200_000, 3)
    parts = [init_rows(*sharding.range(r), 2, 0.02, 7, torch.float32) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)


def test_bad_ids_raise_and_change_nothing():
    table = ShardedEngramTable(N, D)
    before = table.rows.clone()
    for bad in (torch.tensor([0, N]), torch.tensor([-1, 3]), torch.tensor([0.5])):
        with pytest.raises(ValueError, match="out of range|integer"):
            table.lookup(bad)
    with pytest.raises(ValueError, match=f"valid 0..{N - 1}"):
        table.accumulate_grad(torch.tensor([N + 5]), torch.zeros(1, D))
    table.step(LR)
    assert torch.equal(table.rows, before)


def test_world_larger_than_rows_and_bad_config_raise():
    with pytest.raises(ValueError, match="cannot be sharded over 4 ranks"):
        RowSharding(3, 4)
    with pytest.raises(ValueError, match="engram.optimizer"):
        ShardedEngramTable(N, D, optimizer="sgd")
    with pytest.raises(ValueError, match="engram.table_dtype"):
        ShardedEngramTable(N, D, table_dtype="float16")


def test_row_sharding_bounds_and_owner_counts():
    sharding = RowSharding(10, 3)
    assert sharding.bounds == [0, 4, 7, 10]
    assert sharding.counts_per_owner(torch.tensor([0, 3, 4, 9])).tolist() == [2, 1, 1]


def test_stats_report_wait_and_unique_ratio():
    table = ShardedEngramTable(N, D, use_cpu_adam=False)
    table.lookup(torch.tensor([1, 1, 2, 2]))
    stats = table.stats()
    assert stats["unique_ratio"] == 0.5 and stats["lookups"] == 1 and stats["wait_s"] > 0
    assert stats["bytes_per_rank"] >= N * D * 4 and table.stats()["lookups"] == 0


def test_loader_dedup_matches_table_dedup_and_is_checked():
    ids = torch.randint(0, 50, (4, 7, 3), generator=torch.Generator().manual_seed(1))
    unique = UniqueIds.of(ids)
    expected_unique, expected_inverse = torch.unique(ids.flatten(), return_inverse=True)
    assert torch.equal(unique.unique, expected_unique) and torch.equal(unique.inverse, expected_inverse)
    table = ShardedEngramTable(60, 4, use_cpu_adam=False)
    assert torch.equal(table.lookup(ids, unique), table.lookup(ids.clone()))
    with pytest.raises(ValueError, match="unique ids were computed for 84 ids, got 3"):
        table.lookup(torch.tensor([1, 2, 3]), unique)
    with pytest.raises(ValueError, match="out of range"):
        table.lookup(torch.tensor([1, 60]), UniqueIds.of(torch.tensor([1, 60])))


def test_prefetch_thread_only_where_a_core_is_free():
    from engram_train.memory.prefetch import core_is_free_for_prefetch

    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)  # the compute occupies every core: nothing to overlap
        assert not core_is_free_for_prefetch(torch.device("cpu"), ranks_on_this_host=1)
        torch.set_num_threads(1)
        assert core_is_free_for_prefetch(torch.device("cpu"), ranks_on_this_host=1) == (cores > 1)
        assert not core_is_free_for_prefetch(torch.device("cpu"), ranks_on_this_host=cores)
        assert core_is_free_for_prefetch(torch.device("cuda"), ranks_on_this_host=cores), "host cores wait for the GPU"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("use_cpu_adam", [False, True], ids=["torch_adam", "cpu_adam"])
def test_a_table_reloaded_into_a_fresh_process_state_continues_bit_for_bit(use_cpu_adam, tmp_path):
    """Resume from every step: save, load into a new table (a new optimizer, a new DeepSpeed kernel object,
    as in a restarted process) and train on; rows and moments equal the uninterrupted run's exactly."""
    steps = 12
    continuous = ShardedEngramTable(N, D, seed=3, use_cpu_adam=use_cpu_adam)
    _train(continuous, steps=steps)
    batches = list(_batches(steps))
    for stop in range(1, steps):
        first = ShardedEngramTable(N, D, seed=3, use_cpu_adam=use_cpu_adam)
        train_table(first, batches[:stop], lr=LR)
        folder = tmp_path / f"step_{stop}"
        folder.mkdir()
        write_table_files(snapshot_table(first), folder)  # the Checkpointer's calls, without a backbone
        resumed = ShardedEngramTable(N, D, seed=99, use_cpu_adam=use_cpu_adam)
        load_table(resumed, folder)
        train_table(resumed, batches[stop:], lr=LR)
        assert torch.equal(resumed.rows, continuous.rows), f"rows differ after resuming at step {stop}"
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(_dense_state(resumed, name), _dense_state(continuous, name)), (name, stop)


def test_counters_lose_no_count_from_the_prefetch_thread(monkeypatch):
    """The prefetch thread counts its lookups while the trainer reads and resets the counters every log step: a count
    arriving between the read and the reset lands in the next read, not in the discarded dict. Made to happen on
    every read: the fresh counters are built (inside ``stats``) while another thread counts; it either finishes
    (the bug: its count is lost) or blocks on the lock until the reset is done; removing the lock from either
    ``count`` or ``stats`` fails this. Race-free either way: the final total is read after every counting thread
    has ended."""
    import threading

    import engram_train.memory.table as table_module

    table = ShardedEngramTable(N, D, seed=3, use_cpu_adam=False)
    zero_stats, counters = table_module._zero_stats, []

    def zero_stats_while_counting():
        counter = threading.Thread(target=table.count, kwargs={"lookups": 1})
        counter.start()
        counter.join(timeout=0.2)  # long enough for an unblocked count to finish
        counters.append(counter)
        return zero_stats()

    monkeypatch.setattr(table_module, "_zero_stats", zero_stats_while_counting)
    seen = sum(table.stats(reset=True)["lookups"] for _ in range(5))
    for counter in counters:
        counter.join()
    seen += table.stats(reset=False)["lookups"]
    assert len(counters) == 5 and seen == 5
