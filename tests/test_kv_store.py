"""The KV tier on a real Ray cluster: round trips, identity, packing, budget, faults, ownership."""

from __future__ import annotations

import time
import uuid

import pytest
import ray
import torch

from edgeacc_ray.prefix_keys import ROOT_KEY, page_key
from kv_store import ROOT, KVTierClient, ModelIdentity
from kv_store.messages import ChainSegment, PutBatch
from kv_store.page_codec import pack_pages
from kv_store.store_actor import STORE_NAMESPACE, get_store

PAGE_SIZE = 16
IDENTITY = ModelIdentity("tiny", torch.float32, (2, 2, 2, PAGE_SIZE, 16))  # 8 KiB per page
PAGE = IDENTITY.page_nbytes


def chain_keys(num_pages: int, seed: int = 0) -> list[bytes]:
    """The engine's own prefix keys for a random prompt of num_pages full pages."""
    tokens = torch.randint(
        0, 8000, (num_pages * PAGE_SIZE,), generator=torch.Generator().manual_seed(seed)
    ).tolist()
    keys, parent = [], ROOT_KEY
    for start in range(0, len(tokens), PAGE_SIZE):
        parent = page_key(parent, tokens[start : start + PAGE_SIZE])
        keys.append(parent)
    return keys


def random_pages(num_pages: int, identity: ModelIdentity = IDENTITY) -> torch.Tensor:
    return torch.randn(num_pages, *identity.page_shape).to(identity.dtype)


def used_object_store_bytes() -> int:
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return get_memory_info_reply(get_state_from_address(None)).store_stats.object_store_bytes_used


@pytest.fixture
def store_name(ray_cluster):
    """A store of this test's own, killed for good afterwards."""
    name = f"test-kv-store-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        ray_cluster.kill(ray_cluster.get_actor(name, namespace=STORE_NAMESPACE), no_restart=True)
    except ValueError:
        pass


@pytest.fixture
def make_client(store_name):
    clients = []

    def make(
        identity: ModelIdentity = IDENTITY, budget_bytes: int = 4 << 20, **options
    ) -> KVTierClient:
        options.setdefault("timeout_s", 10.0)  # this box is shared: no read may give up by accident
        client = KVTierClient(identity, budget_bytes, store_name=store_name, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_root_is_the_engine_root_key():
    assert ROOT == ROOT_KEY


def test_pages_round_trip_as_the_leading_run_of_keys(make_client):
    client = make_client()
    keys, pages = chain_keys(20), random_pages(20)
    assert client.store_pages(ROOT, keys[:12], pages[:12])
    assert client.store_pages(keys[11], keys[12:], pages[12:])
    assert client.flush(30)
    assert client.match(keys) == 20
    assert client.match(keys[:5] + chain_keys(1, seed=9)) == 5
    loaded = client.load(keys + chain_keys(3, seed=5))
    assert loaded is not None and torch.equal(loaded, pages)
    prefix = client.load_async(keys[:7]).result(timeout=30)
    assert prefix is not None and torch.equal(prefix, pages[:7])
    assert client.load(chain_keys(2, seed=11)) is None
    stats = client.stats()
    assert (stats.store.stored, stats.store.hits, stats.store.misses) == (20, 27, 5)
    assert (stats.dropped_pages, stats.failed_calls, stats.corrupt_pages) == (0, 0, 0)


def test_another_model_dtype_or_shard_never_hits(make_client):
    bf16 = ModelIdentity("tiny", torch.bfloat16, IDENTITY.page_shape)
    writer, other_model = (
        make_client(),
        make_client(ModelIdentity("other", torch.float32, IDENTITY.page_shape)),
    )
    other_dtype, other_shard = (
        make_client(bf16),
        make_client(ModelIdentity("tiny", torch.float32, IDENTITY.page_shape, variant="tp1of2")),
    )
    keys = chain_keys(4)
    writer.store_pages(ROOT, keys, random_pages(4))
    assert writer.flush(30) and writer.match(keys) == 4
    for reader in (other_model, other_dtype, other_shard):
        assert reader.match(keys) == 0
        assert reader.load(keys) is None
    bf16_pages = random_pages(4, bf16)
    assert other_dtype.put_pages(ROOT, keys, bf16_pages) == 4
    assert torch.equal(other_dtype.load(keys), bf16_pages)


def test_pages_are_packed_into_objects_of_about_object_bytes(make_client):
    client = make_client(object_bytes=8 * PAGE, linger_s=1.0)
    keys, pages = chain_keys(36), random_pages(36)
    for start in range(0, 36, 3):  # twelve small writes, as an engine commits pages
        client.store_pages(
            ROOT if start == 0 else keys[start - 1],
            keys[start : start + 3],
            pages[start : start + 3],
        )
    assert client.flush(30)
    store = client.stats().store
    assert (store.pages, store.objects) == (36, 4)  # 3 writes (9 pages, >= 8) per object
    big_keys = chain_keys(40, seed=1)
    client.store_pages(ROOT, big_keys, random_pages(40))  # one large write is cut into objects
    assert client.flush(30)
    assert client.stats().store.objects == 4 + 5


def test_the_budget_holds_and_chains_lose_their_ends_first(make_client):
    budget = 16 * PAGE
    client = make_client(budget_bytes=budget, object_bytes=4 * PAGE)
    base = used_object_store_bytes()
    chains = [chain_keys(6, seed=s) for s in range(12)]
    for keys in chains:  # 72 pages into a 16-page tier, each chain in two objects (4 + 2 pages)
        client.store_pages(ROOT, keys, random_pages(6))
        assert client.flush(30)
        client.match(chains[0])  # keep the first chain hot
    store = client.stats().store
    assert store.bytes_held <= budget and store.evictions >= 72 - 16
    assert client.match(chains[0]) == 6
    held = [[client.match([key]) == 1 for key in keys] for keys in chains]
    for pages_held in held:
        assert pages_held == sorted(pages_held, reverse=True)  # a held prefix, never a hole
    assert any(0 < sum(pages_held) < 6 for pages_held in held)  # some chain lost only its end
    assert client.load(chains[1]) is None
    deadline = (
        time.monotonic() + 10
    )  # what Ray really holds (argument objects are freed asynchronously)
    while used_object_store_bytes() - base > budget:
        assert time.monotonic() < deadline, used_object_store_bytes() - base
        time.sleep(0.1)


def test_a_full_write_queue_drops_pages_and_never_blocks(make_client):
    client = make_client(object_bytes=1 << 20, linger_s=5.0, max_pending_bytes=3 * PAGE)
    keys, pages = chain_keys(4), random_pages(4)
    started = time.monotonic()
    assert client.store_pages(ROOT, keys[:2], pages[:2])
    assert not client.store_pages(keys[1], keys[2:], pages[2:])
    assert time.monotonic() - started < 0.5
    assert client.flush(30)
    stats = client.stats()
    assert (stats.store.stored, stats.dropped_pages) == (2, 2)


def test_corrupt_or_misshapen_pages_are_misses(make_client, store_name):
    client = make_client()
    store = get_store(4 << 20, store_name)
    keys, pages = chain_keys(5), random_pages(5)
    data, checksums = pack_pages([pages])
    data = data.copy()
    data[2 * PAGE + 100] ^= 0xFF  # page 2 rots after its checksum was taken
    ray.get(
        store.put.remote(
            PutBatch(IDENTITY.namespace, PAGE, (ChainSegment(ROOT, tuple(keys)),), checksums, data)
        ),
        timeout=30,
    )
    loaded = client.load(keys)
    assert loaded is not None and torch.equal(loaded, pages[:2])
    assert client.stats().corrupt_pages == 1

    other = chain_keys(2, seed=3)  # pages of another size under this identity
    half, half_sums = pack_pages([torch.zeros(2, PAGE // 2, dtype=torch.uint8)])
    ray.get(
        store.put.remote(
            PutBatch(
                IDENTITY.namespace, PAGE // 2, (ChainSegment(ROOT, tuple(other)),), half_sums, half
            )
        ),
        timeout=30,
    )
    assert client.match(other) == 2
    assert client.load(other) is None


def test_a_killed_store_costs_misses_then_comes_back_by_itself(
    make_client, store_name, ray_cluster
):
    client = make_client()
    keys, pages = chain_keys(6), random_pages(6)
    client.store_pages(ROOT, keys, pages)
    assert client.flush(30) and client.match(keys) == 6
    ray_cluster.kill(ray_cluster.get_actor(store_name, namespace=STORE_NAMESPACE), no_restart=False)
    deadline = time.monotonic() + 60
    while client.load(keys) is not None:  # the kill lands asynchronously; no call ever raises
        assert time.monotonic() < deadline, "the store was not killed"
    assert client.match(keys) == 0  # the pages died with their owner: a miss
    while True:
        client.store_pages(ROOT, keys, pages)
        assert client.flush(30)
        if client.match(keys) == 6:
            break
        assert time.monotonic() < deadline, "the store did not come back"
    assert torch.equal(client.load(keys), pages)
    assert client.stats().store.stored == 6  # a restarted store starts empty


def test_pages_outlive_the_process_that_produced_them(make_client, store_name, ray_cluster):
    @ray_cluster.remote(num_cpus=0)
    class Producer:
        def produce(self, name: str, keys: list[bytes], pages: torch.Tensor) -> bool:
            client = KVTierClient(IDENTITY, 4 << 20, store_name=name)
            client.store_pages(ROOT, keys, pages)
            done = client.flush(30)
            client.close()
            return done

    keys, pages = chain_keys(8), random_pages(8)
    producer = Producer.remote()
    assert ray_cluster.get(producer.produce.remote(store_name, keys, pages), timeout=60)
    ray_cluster.kill(producer)
    with pytest.raises(ray_cluster.exceptions.RayActorError):
        ray_cluster.get(producer.produce.remote(store_name, keys, pages), timeout=30)
    loaded = make_client().load(keys)
    assert loaded is not None and torch.equal(loaded, pages)
