"""Data: the stdlib byte corpus and its cache, LM batches and the sharded sampler, the digits loader."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch

from commlab.errors import CommlabError
from commlab.models import (
    ByteCorpus,
    MissingDependencyError,
    ShardedBatchSampler,
    lm_batch,
    load_digits_images,
)
from commlab.models import data as data_module

SMALL = 200_000  # bytes: enough stdlib for the tests, quick to build


def test_corpus_is_deterministic_and_cached_per_python_and_cap(tmp_path):
    a = ByteCorpus.from_stdlib(SMALL, cache=tmp_path / "a")
    b = ByteCorpus.from_stdlib(SMALL, cache=tmp_path / "b")
    assert len(a.data) == SMALL and np.array_equal(a.data, b.data)
    assert a.path.read_bytes() == b.path.read_bytes() == a.data.tobytes()
    v = sys.version_info
    assert f"{v.major}.{v.minor}.{v.micro}" in a.path.name and str(SMALL) in a.path.name
    assert [p.name for p in (tmp_path / "a").iterdir()] == [a.path.name]  # no temporary files left behind
    assert "import" in ByteCorpus.decode(a.data[:50_000])  # real Python source


def test_corpus_cache_is_reused_and_a_new_cap_rebuilds(tmp_path, monkeypatch):
    first = ByteCorpus.from_stdlib(SMALL, cache=tmp_path)

    def no_rebuild(max_bytes):
        raise AssertionError(f"rebuilt the corpus for max_bytes={max_bytes}")

    monkeypatch.setattr(data_module, "stdlib_sources", no_rebuild)
    again = ByteCorpus.from_stdlib(SMALL, cache=tmp_path)
    assert again.path == first.path and np.array_equal(again.data, first.data)
    with pytest.raises(AssertionError, match="max_bytes=100000"):
        ByteCorpus.from_stdlib(100_000, cache=tmp_path)  # another fingerprint: not the cached file


def test_corpus_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMLAB_CACHE", str(tmp_path / "env"))
    corpus = ByteCorpus.from_stdlib(50_000)
    assert corpus.path.parent == tmp_path / "env" and corpus.path.is_file()


def test_stdlib_sources_are_a_prefix_stream():
    short, long = data_module.stdlib_sources(1_000), data_module.stdlib_sources(5_000)
    assert len(short) == 1_000 and long.startswith(short)


def test_split_sizes_and_positions():
    data = bytes(range(256)) * 40  # 10240 bytes
    corpus = ByteCorpus(data, val_fraction=0.05)
    assert len(corpus.val) == 512 and len(corpus.train) == 10240 - 512
    assert corpus.val.tobytes() == data[-512:] and corpus.train.tobytes() == data[:-512]
    assert corpus.split("train") is corpus.train and corpus.split("val") is corpus.val


def test_unigram_loss_by_hand():
    corpus = ByteCorpus(b"aaab" + b"ab", val_fraction=2 / 6)  # train "aaab", val "ab"
    total = 4 + 256  # add-one smoothing over 256 byte values
    expected = -(math.log(4 / total) + math.log(2 / total)) / 2
    assert corpus.unigram_loss() == pytest.approx(expected)


def test_unigram_loss_of_stdlib_is_below_uniform(tmp_path):
    loss = ByteCorpus.from_stdlib(SMALL, cache=tmp_path).unigram_loss()
    assert 2.0 < loss < math.log(256)


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: ByteCorpus(b"abc", val_fraction=0.0), ["val_fraction=0.0"]),
        (lambda: ByteCorpus(b"a"), ["len(data)=1"]),
        (lambda: ByteCorpus(np.zeros(8, dtype=np.int64)), ["int64", "uint8"]),
        (lambda: ByteCorpus(b"abcdef").split("test"), ["'test'", "'val'"]),
        (lambda: ByteCorpus.from_stdlib(0), ["max_bytes=0"]),
    ],
)
def test_bad_corpus_arguments(build, words):
    with pytest.raises(CommlabError) as info:
        build()
    assert all(word in str(info.value) for word in words)


def test_encode_decode_round_trip():
    assert ByteCorpus.decode(ByteCorpus.encode("déjà vu")) == "déjà vu"


SPLIT = np.arange(1000, dtype=np.int64) % 251  # distinct windows, so rows identify their offsets
SPLIT_BYTES = SPLIT.astype(np.uint8)


def test_lm_batch_shapes_targets_and_reproducibility():
    x, y = lm_batch(SPLIT_BYTES, step=3, global_batch=8, seq_len=16, seed=7)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):  # each row is a window of the data and its shift by one
        start = int(np.flatnonzero(SPLIT_BYTES[:-16] == row_x[0].item())[0])
        assert row_x.tolist() == SPLIT_BYTES[start : start + 16].tolist()
        assert row_y.tolist() == SPLIT_BYTES[start + 1 : start + 17].tolist()
    again = lm_batch(SPLIT_BYTES, step=3, global_batch=8, seq_len=16, seed=7)
    assert torch.equal(again[0], x)
    assert not torch.equal(lm_batch(SPLIT_BYTES, step=4, global_batch=8, seq_len=16, seed=7)[0], x)
    assert not torch.equal(lm_batch(SPLIT_BYTES, step=3, global_batch=8, seq_len=16, seed=8)[0], x)


@pytest.mark.parametrize("world", [2, 4])
def test_lm_batch_rank_shards_stack_to_the_single_process_batch(world):
    for step in (0, 5):
        full_x, full_y = lm_batch(SPLIT_BYTES, step, global_batch=8, seq_len=12, seed=1)
        shards = [lm_batch(SPLIT_BYTES, step, 8, 12, seed=1, rank=r, world=world) for r in range(world)]
        assert all(x.shape == (8 // world, 12) for x, _ in shards)
        assert torch.equal(torch.cat([x for x, _ in shards]), full_x)
        assert torch.equal(torch.cat([y for _, y in shards]), full_y)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"global_batch": 6, "world": 4}, ["global_batch=6", "world=4"]),
        ({"global_batch": 8, "world": 2, "rank": 2}, ["rank=2", "[0, 2)"]),
        ({"global_batch": 8, "seq_len": 1000}, ["seq_len=1000", "1000"]),
    ],
)
def test_lm_batch_bad_arguments(kwargs, words):
    args = {"step": 0, "seq_len": 8, **kwargs}
    with pytest.raises(CommlabError) as info:
        lm_batch(SPLIT_BYTES, **args)
    assert all(word in str(info.value) for word in words)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def concat(lists):
    return list(itertools.chain.from_iterable(lists))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_rank_shards_union_to_the_global_batch(world):
    single = ShardedBatchSampler(100, global_batch=12, seed=4)
    ranks = [ShardedBatchSampler(100, 12, rank=r, world=world, seed=4) for r in range(world)]
    for step in range(20):  # crosses epochs: 8 steps each
        shards = [s.indices(step) for s in ranks]
        assert all(len(shard) == 12 // world for shard in shards)
        assert concat(shards) == single.indices(step) == single.global_indices(step)


def test_sampler_epoch_is_a_permutation_and_epochs_differ():
    sampler = ShardedBatchSampler(40, global_batch=8, seed=0)
    epoch0 = concat(sampler.indices(k) for k in range(5))
    epoch1 = concat(sampler.indices(k) for k in range(5, 10))
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and epoch0 != epoch1


def test_sampler_resumes_exactly():
    original = ShardedBatchSampler(50, global_batch=4, rank=1, world=2, seed=9)
    stream = iter(original)
    take(stream, 7)
    state = original.state_dict()
    assert state["position"] == 7
    expected = take(stream, 10)
    resumed = ShardedBatchSampler(50, global_batch=4, rank=1, world=2, seed=9)
    resumed.load_state_dict(state)
    assert take(iter(resumed), 10) == expected


def test_sampler_resumes_under_another_dp_size():
    single = ShardedBatchSampler(50, global_batch=4, seed=2)
    stream = iter(single)
    take(stream, 3)
    state = single.state_dict()
    expected = take(stream, 5)
    ranks = [ShardedBatchSampler(50, 4, rank=r, world=4, seed=2) for r in range(4)]
    streams = []
    for sampler in ranks:
        sampler.load_state_dict(state)
        streams.append(iter(sampler))
    assert [concat(next(s) for s in streams) for _ in range(5)] == expected


UNSEEDED = ShardedBatchSampler(100, 8).state_dict()


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: ShardedBatchSampler(100, global_batch=10, world=4), ["global_batch=10", "world=4"]),
        (lambda: ShardedBatchSampler(100, global_batch=8, rank=-1, world=2), ["rank=-1"]),
        (lambda: ShardedBatchSampler(100, global_batch=0), ["global_batch=0"]),
        (lambda: ShardedBatchSampler(6, global_batch=8), ["num_samples=6", "global_batch=8"]),
        (
            lambda: ShardedBatchSampler(100, 8, seed=1).load_state_dict(UNSEEDED),
            ["state['seed']=0", "seed=1"],
        ),
    ],
)
def test_sampler_bad_arguments(build, words):
    with pytest.raises(CommlabError) as info:
        build()
    assert all(word in str(info.value) for word in words)


def test_digits_need_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"commlab\[vision\]"):
        load_digits_images()


def test_digits_images():
    pytest.importorskip("sklearn")
    splits = load_digits_images(image_size=16)
    assert splits.train_images.shape == (1437, 1, 16, 16) and splits.test_images.shape == (360, 1, 16, 16)
    assert splits.train_labels.dtype == torch.long and set(splits.test_labels.tolist()) == set(range(10))
    assert abs(
        splits.train_images.mean().item()
    ) < 1e-4 and splits.train_images.std().item() == pytest.approx(1)
    assert load_digits_images(8).train_images.shape == (1437, 1, 8, 8)
    assert torch.equal(load_digits_images(16).test_labels, splits.test_labels)  # a fixed split
