"""The CPU block cache of the generic engines' products (twicediff.torch.block_cache): products give
bitwise the results they give with it off, on every generic engine; large blocks are held between
products and only then (a block freed outside a product, or after one that raised, goes back to the
system); release_cpu_block_cache empties it; TWICEDIFF_CPU_BLOCK_CACHE=0 turns it off; and a thread
allocating large tensors beside products never gets memory a product still uses."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twicediff
from twicediff import TorchTwiceDifferentiable
from twicediff.torch import block_cache

from structured_models import attention_problem

MIB = 2**20


def _problem(seed=0):
    """Intermediates above the cache's 1 MiB threshold even for one direction (GELU's [160, 32, 64])."""
    model, x, y = attention_problem(160, 32, seed)
    return TorchTwiceDifferentiable(model, F.cross_entropy), x, y


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(block_cache.ENV, raising=False)
    twicediff.release_cpu_block_cache()
    yield
    twicediff.release_cpu_block_cache()


@pytest.mark.parametrize("engine", ["func", "autograd", "loop"])
@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_products_are_bitwise_those_without_the_cache(engine, mode, monkeypatch):
    td, x, y = _problem()
    v = torch.randn(8, td.num_params)
    monkeypatch.setenv(block_cache.ENV, "0")
    plain = td.hvp(x, y, v, engine=engine, mode=mode)
    assert twicediff.cpu_block_cache_bytes() == 0
    monkeypatch.delenv(block_cache.ENV)
    first = td.hvp(x, y, v, engine=engine, mode=mode)
    assert twicediff.cpu_block_cache_bytes() > 0  # the cache took part
    second = td.hvp(x, y, v, engine=engine, mode=mode)  # on blocks the first one freed
    assert torch.equal(first, plain) and torch.equal(second, plain)


def test_blocks_are_held_between_products_and_released_on_request():
    td, x, y = _problem()
    v = torch.randn(8, td.num_params)
    want = td.hvp(x, y, v, engine="func")
    held = twicediff.cpu_block_cache_bytes()
    assert 0 < held <= block_cache.CAP_BYTES == 2**30
    # Outside a product the cache is not torch's allocator: a large block freed here is not held.
    big = torch.ones(64 * MIB // 4)
    del big
    assert twicediff.cpu_block_cache_bytes() == held
    # The result, made in the product, outlives it; freeing it later does not fill the cache.
    del want
    assert twicediff.cpu_block_cache_bytes() == held
    twicediff.release_cpu_block_cache()
    assert twicediff.cpu_block_cache_bytes() == 0
    again = td.hvp(x, y, v, engine="func")
    assert torch.isfinite(again).all() and twicediff.cpu_block_cache_bytes() > 0


def test_a_product_that_raises_closes_its_scope():
    td, x, y = _problem()
    v = torch.randn(8, td.num_params)
    with pytest.raises(Exception):
        td.hvp(x[:, :, :7], y, v, engine="func")  # 7 features where the model takes 16
    held = twicediff.cpu_block_cache_bytes()
    big = torch.ones(64 * MIB // 4)
    del big
    assert twicediff.cpu_block_cache_bytes() == held  # not cached: the scope ended with the error


def test_turned_off_by_the_environment(monkeypatch):
    td, x, y = _problem()
    monkeypatch.setenv(block_cache.ENV, "0")
    assert not block_cache.enabled()
    td.hvp(x, y, torch.randn(8, td.num_params), engine="func")
    assert twicediff.cpu_block_cache_bytes() == 0


def test_a_thread_allocating_beside_products_gets_memory_of_its_own():
    """Blocks freed by one thread and reused by another must never be in use twice: a writer thread
    fills fresh large tensors with its own value and checks them while products run and reuse."""
    td, x, y = _problem()
    v = torch.randn(8, td.num_params)
    want = td.hvp(x, y, v, engine="func")
    stop = threading.Event()
    errors = []

    def writer(value):
        try:
            while not stop.is_set():
                t = torch.full((3 * MIB // 4,), float(value))  # 3 MiB: cached while a product runs
                torch.cos(t, out=t)
                torch.acos(t, out=t)
                if not torch.allclose(t, torch.full_like(t, float(value)), atol=1e-5):
                    errors.append(f"writer {value} found foreign data")
                    return
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(k / 4,)) for k in (1, 2)]
    for t in threads:
        t.start()
    try:
        results = [td.hvp(x, y, v, engine="func") for _ in range(6)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    for r in results:
        assert torch.equal(r, want)


def test_cuda_products_leave_it_alone(device):
    if device.type != "cuda":
        pytest.skip("the CPU case is every other test here")
    td, x, y = _problem()
    td = TorchTwiceDifferentiable(td.model.to(device), F.cross_entropy)
    td.hvp(x.to(device), y.to(device), torch.randn(4, td.num_params, device=device), engine="func")
    assert twicediff.cpu_block_cache_bytes() == 0


def test_under_a_set_budget_nothing_is_held_past_a_product():
    """A budget the user sets bounds what a computation adds; blocks held after a generic product
    would sit uncounted beside the next one (LiSSA's native products after auto timed func went
    37 MiB over a 384 MiB budget in tests/test_peak_memory.py), so under a set budget the cache
    empties when a product ends."""
    td, x, y = _problem()
    v = torch.randn(8, td.num_params)
    want = td.hvp(x, y, v, engine="func")
    assert twicediff.cpu_block_cache_bytes() > 0
    with twicediff.memory_budget(2**31):
        got = td.hvp(x, y, v, engine="func")
        assert twicediff.cpu_block_cache_bytes() == 0
    assert torch.equal(got, want)
