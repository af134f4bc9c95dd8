"""dataloader.py: best-fit packing against a naive reference packer, exact resume (JSON state, across a file
and an epoch boundary, with the real tokenizer), 2-rank disjointness/coverage, clear errors."""
import json
import random

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picochat import dataloader
from picochat.dataloader import pretrain_batches, assign_row_groups
from picochat.train_loop import gather_loader_states, rank_loader_state
from picochat.common import compute_cleanup

FIRST = 0x21  # doc k is the character chr(FIRST + k) repeated: every token names its document


class CharTokenizer:
    """One token per character (ord < 256), BOS = 256. Makes every row decodable back to document ids."""
    bos = 256

    def get_bos_token_id(self):
        return self.bos

    def encode(self, texts, prepend=None, num_threads=1):
        pre = [] if prepend is None else [prepend]
        if isinstance(texts, str):
            return pre + [ord(c) for c in texts]
        return [pre + [ord(c) for c in t] for t in texts]


# rows per row group, per file; the last file is the validation split
LAYOUT = [[5, 7, 4], [6, 0, 3], [8, 5, 2], [4, 4]]


def write_char_corpus(root, seed=0):
    """Docs of varied length 0..40 chars (row = 17 tokens at T=16: some fit whole, some must be cropped).
    Returns (data_dir, docs) with docs[(file, rg, doc)] = text."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs, k = {}, 0
    for f, rgs in enumerate(LAYOUT):
        texts = []
        for g, n in enumerate(rgs):
            for d in range(n):
                docs[(f, g, d)] = chr(FIRST + k) * rng.choice([0, 1, 3, 5, 8, 12, 16, 20, 33, 40])
                texts.append(docs[(f, g, d)])
                k += 1
        writer = pq.ParquetWriter(root / f"shard_{f:05d}.parquet", pa.schema([("text", pa.string())]))
        start = 0
        for n in rgs:  # one write_table per row group (possibly empty) to control the layout exactly
            writer.write_table(pa.table({"text": pa.array(texts[start:start + n], type=pa.string())}))
            start += n
        writer.close()
    return root, docs


def write_word_corpus(root, seed=0, layout=((4, 3), (5,), (3, 4, 2), (3,))):
    rng = random.Random(seed)
    words = "the of and a to in is was he for it with as his on be at by I had not are but from or".split()
    words += ["Héllo", "wörld", "12", "345", "6,7", "x=y+1;", "naïve", "日本", "🙂", "\n\n"]
    root.mkdir(parents=True, exist_ok=True)
    for f, rgs in enumerate(layout):
        writer = pq.ParquetWriter(root / f"shard_{f:05d}.parquet", pa.schema([("text", pa.string())]))
        for n in rgs:
            texts = [" ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 6, 10, 18, 30, 60])))
                     for _ in range(n)]
            writer.write_table(pa.table({"text": texts}))
        writer.close()
    return root


def take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()  # stops the producer thread
    return out


def reference_batches(chunks, B, T, buffer_size, n_batches):
    """Naive best-fit packer straight from the reference's description. chunks: cycled list of doc chunks."""
    def stream():
        while True:
            yield from chunks
    s, buf, batches, cropped = stream(), [], [], 0
    for _ in range(n_batches):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buf) < buffer_size:
                    buf.extend(next(s))
                rem = T + 1 - len(row)
                fits = [i for i, d in enumerate(buf) if len(d) <= rem]
                if fits:
                    row += buf.pop(max(fits, key=lambda i: len(buf[i])))  # max() keeps the first of ties
                else:
                    d = buf.pop(min(range(len(buf)), key=lambda i: len(buf[i])))
                    row += d[:rem]
                    cropped += len(d) - rem
            rows.append(row)
        batches.append(rows)
    return batches, cropped


def test_packing_matches_reference_and_invariants(tmp_path):
    data, docs = write_char_corpus(tmp_path / "corpus")
    tok = CharTokenizer()
    B, T, buffer_size, chunk, n = 3, 16, 6, 4, 40
    # this rank's stream (1 rank): row groups in file order, sliced in chunks of `chunk` documents
    chunks = []
    for f, rgs in enumerate(LAYOUT[:-1]):
        for g, cnt in enumerate(rgs):
            for s in range(0, cnt, chunk):
                chunks.append([tok.encode(docs[(f, g, d)], prepend=tok.bos) for d in range(s, min(s + chunk, cnt))])
    expected, ref_cropped = reference_batches(chunks, B, T, buffer_size, n)

    loader = dataloader.DistributedBestFitLoader(tok, B, T, "train", data_dir=data, buffer_size=buffer_size,
                                                 tokenizer_batch_size=chunk, rank=0, world_size=1)
    it = iter(loader)
    got = take(it, n)
    for (x, y, _), rows in zip(got, expected):
        assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        full = torch.cat([x, y[:, -1:]], dim=1)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert full.tolist() == rows
        assert (x[:, 0] == tok.bos).all()  # BOS-aligned
        for row in full.tolist():  # every segment is one document: whole, except possibly the row's last
            starts = [i for i, t in enumerate(row) if t == tok.bos] + [len(row)]
            for a, b in zip(starts, starts[1:]):
                seg = row[a + 1:b]
                assert len(set(seg)) <= 1
                if seg and b < len(row):
                    k = seg[0] - FIRST
                    assert len(seg) == len(next(t for t in docs.values() if t and ord(t[0]) - FIRST == k))
    stats = loader.stats
    assert stats["batches"] == n and stats["utilisation"] == 1.0
    assert stats["tokens"] == n * B * (T + 1)
    assert stats["cropped_tokens"] == ref_cropped > 0
    assert stats["crop_fraction"] == pytest.approx(ref_cropped / (n * B * (T + 1) + ref_cropped))
    assert got[-1][2]["epoch"] >= 2  # the stream is infinite: 40 batches run past one epoch of this corpus


def test_split_docs_packs_pieces_like_documents(tmp_path):
    """split_docs=True: long documents become BOS-first pieces of <= T+1 tokens, packed exactly like the reference
    packer packs documents; far fewer tokens are cropped away; concatenated pieces give back the document."""
    bos, T = 256, 16
    for n in (1, 17, 18, 33, 34, 35, 80):
        tok = np.array([bos] + list(range(n - 1)), dtype=np.int64)
        pieces = dataloader.split_pieces(tok, T, bos)
        assert all(len(p) <= T + 1 and p[0] == bos for p in pieces)
        assert np.concatenate([pieces[0]] + [p[1:] for p in pieces[1:]]).tolist() == tok.tolist()
        assert len(pieces) == (1 if n <= T + 1 else 1 + -(-(n - T - 1) // T))
    data, docs = write_char_corpus(tmp_path / "corpus")
    tok = CharTokenizer()
    B, buffer_size, chunk, n = 3, 6, 4, 40
    chunks = []
    for f, rgs in enumerate(LAYOUT[:-1]):
        for g, cnt in enumerate(rgs):
            for s in range(0, cnt, chunk):
                chunks.append([p.tolist() for d in range(s, min(s + chunk, cnt))
                               for p in dataloader.split_pieces(np.array(tok.encode(docs[(f, g, d)], prepend=bos)),
                                                                T, bos)])
    expected, ref_cropped = reference_batches(chunks, B, T, buffer_size, n)
    loader = dataloader.DistributedBestFitLoader(tok, B, T, "train", data_dir=data, buffer_size=buffer_size,
                                                 tokenizer_batch_size=chunk, rank=0, world_size=1, split_docs=True)
    got = take(iter(loader), n)
    for (x, y, _), rows in zip(got, expected):
        assert torch.cat([x, y[:, -1:]], dim=1).tolist() == rows
    stats = loader.stats
    assert stats["pieces"] > 0 and stats["cropped_tokens"] == ref_cropped
    cropping = dataloader.DistributedBestFitLoader(tok, B, T, "train", data_dir=data, buffer_size=buffer_size,
                                                   tokenizer_batch_size=chunk, rank=0, world_size=1)
    take(iter(cropping), n)
    assert stats["crop_fraction"] < 0.5 * cropping.stats["crop_fraction"]


@pytest.mark.parametrize("split_docs", [False, True])
def test_exact_resume_across_file_and_epoch(tmp_path, tiny_tokenizer, split_docs):
    data = write_word_corpus(tmp_path / "corpus")
    kw = dict(B=2, T=32, split="train", data_dir=data, buffer_size=8, tokenizer_threads=2, tokenizer_batch_size=3,
              split_docs=split_docs)
    N = 70
    straight = take(pretrain_batches(tiny_tokenizer, **kw), N)
    states = [s for _, _, s in straight]
    bos = tiny_tokenizer.get_bos_token_id()
    assert all((x[:, 0] == bos).all() for x, _, _ in straight)
    k_file = next(i for i, s in enumerate(states) if s["file"] != states[0]["file"])
    k_epoch = next(i for i, s in enumerate(states) if s["epoch"] == 2)  # sizes chosen so both happen early
    assert k_epoch < N - 10 and max(s["epoch"] for s in states) >= 2
    for k in sorted({1, k_file, k_file + 1, k_epoch, k_epoch + 1, N - 1}):
        state = json.loads(json.dumps(states[k - 1]))  # the state saved with batch k, as a checkpoint stores it
        resumed = take(pretrain_batches(tiny_tokenizer, resume_state=state, **kw), N - k)
        for (x0, y0, s0), (x1, y1, s1) in zip(straight[k:], resumed):
            assert torch.equal(x0, x1) and torch.equal(y0, y1), f"resume after batch {k} diverged"
            assert s0 == s1
    # through the checkpoint's all-ranks form
    gathered = gather_loader_states(states[9])
    assert gathered == {"world_size": 1, "ranks": [states[9]]}
    own = rank_loader_state(json.loads(json.dumps(gathered)), 0, 1)
    x, y, _ = take(pretrain_batches(tiny_tokenizer, resume_state=own, **kw), 1)[0]
    assert torch.equal(x, straight[10][0]) and torch.equal(y, straight[10][1])
    assert len(json.dumps(states[-1])) < 2000  # small enough for checkpoint meta
    if split_docs:  # pieces of one document are resumed mid-document, from the buffer refs
        assert any(r[3] > 0 for st in states for r in st["buffer"])
    other = dict(json.loads(json.dumps(states[9])), version=1)  # a state format this picochat does not read
    with pytest.raises(ValueError, match="unsupported dataloader state version 1"):
        take(pretrain_batches(tiny_tokenizer, resume_state=other, **kw), 1)


def test_state_mismatches_are_clear(tmp_path):
    data, _ = write_char_corpus(tmp_path / "corpus")
    tok = CharTokenizer()
    kw = dict(data_dir=data, buffer_size=4, tokenizer_batch_size=4)
    _, _, state = take(pretrain_batches(tok, 2, 16, "train", rank=0, world_size=2, **kw), 1)[0]
    with pytest.raises(ValueError, match="rank 0 of 2"):
        pretrain_batches(tok, 2, 16, "train", resume_state=state, rank=1, world_size=2, **kw)
    with pytest.raises(ValueError, match="same world size"):
        rank_loader_state({"world_size": 2, "ranks": [state, state]}, 0, 1)
    with pytest.raises(ValueError, match="split"):
        pretrain_batches(tok, 2, 16, "val", resume_state=state, rank=0, world_size=2, **kw)


def test_two_ranks_disjoint_and_cover(tmp_path, monkeypatch):
    data, docs = write_char_corpus(tmp_path / "corpus")
    train_sizes = LAYOUT[:-1]
    all_rgs = {(f, g) for f, rgs in enumerate(train_sizes) for g in range(len(rgs))}
    mine = [assign_row_groups(train_sizes, r, 2) for r in range(2)]
    assert not set(mine[0]) & set(mine[1]) and set(mine[0]) | set(mine[1]) == all_rgs
    assert len(mine[0]) - len(mine[1]) in (0, 1)
    # rank/world come from torchrun's environment by default
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    tok = CharTokenizer()
    loader = dataloader.DistributedBestFitLoader(tok, 2, 16, "train", data_dir=data, buffer_size=4,
                                                 tokenizer_batch_size=4)
    assert (loader.rank, loader.world_size) == (1, 2) and loader.mine == mine[1]
    # each rank's document stream over one epoch: disjoint, and together every document exactly once
    read = []
    for r in range(2):
        stream = dataloader._DocStream(loader.files, loader.sizes, mine[r], chunk_size=4)
        refs = []
        while stream.epoch == 1:
            refs += stream.next_chunk()[0]
        read.append(refs)
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == sorted(k for k in docs if k[0] < len(train_sizes))
    # and what the loader of each rank actually packs comes only from that rank's documents
    for r in range(2):
        allowed = {ord(docs[k][0]) - FIRST for k in read[r] if docs[k]}
        it = pretrain_batches(tok, 2, 16, "train", data_dir=data, buffer_size=4, tokenizer_batch_size=4,
                              rank=r, world_size=2)
        seen = {t - FIRST for x, y, _ in take(it, 20) for t in torch.cat([x, y[:, -1:]], 1).flatten().tolist()
                if t != tok.bos}
        assert seen and seen <= allowed
    # fewer row groups than ranks: every rank still gets data instead of hanging
    assert assign_row_groups([[3]], 1, 2) == [(0, 0)]


def test_missing_text_column_names_file(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    pq.write_table(pa.table({"content": ["a", "b"]}), d / "a.parquet")
    pq.write_table(pa.table({"text": ["a", "b"]}), d / "b.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet has no `text` column"):
        pretrain_batches(CharTokenizer(), 1, 8, "train", data_dir=d)


def test_producer_errors_reach_the_consumer(tmp_path):
    data, _ = write_char_corpus(tmp_path / "corpus")

    class Broken(CharTokenizer):
        def encode(self, texts, prepend=None, num_threads=1):
            raise RuntimeError("tokenizer exploded")
    with pytest.raises(RuntimeError, match="exploded"):
        next(pretrain_batches(Broken(), 1, 8, "train", data_dir=data))


def test_real_shards_smoke(shared_data, tiny_tokenizer):
    it = pretrain_batches(tiny_tokenizer, 2, 64, "val", data_dir=shared_data / "pretrain", buffer_size=8,
                          tokenizer_batch_size=8)
    batches = take(it, 3)
    for x, y, state in batches:
        assert x.shape == (2, 64) and (x[:, 0] == tiny_tokenizer.get_bos_token_id()).all()
    assert batches[-1][2]["file"] == 0 and len(batches[-1][2]["buffer"]) >= 1


def _ddp_worker(rank, world, port, data, out):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        it = pretrain_batches(CharTokenizer(), 2, 16, "train", data_dir=data, buffer_size=4, tokenizer_batch_size=4)
        _, _, state = take(it, 3)[-1]
        gathered = gather_loader_states(state)  # collective: every rank calls it
        if rank == 0:
            out.write_text(json.dumps(gathered))
    finally:
        compute_cleanup()  # barrier, then teardown


def test_gather_state_two_processes_then_exact_resume(tmp_path):
    import socket
    import torch.multiprocessing as mp
    data, _ = write_char_corpus(tmp_path / "corpus")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "state.json"
    mp.spawn(_ddp_worker, args=(2, port, data, out), nprocs=2, join=True)
    gathered = json.loads(out.read_text())
    assert gathered["world_size"] == 2 and [s["rank"] for s in gathered["ranks"]] == [0, 1]
    kw = dict(data_dir=data, buffer_size=4, tokenizer_batch_size=4, world_size=2)
    for r in range(2):  # every rank resumes from the gathered checkpoint state exactly where it stopped
        straight = take(pretrain_batches(CharTokenizer(), 2, 16, "train", rank=r, **kw), 8)
        resumed = take(pretrain_batches(CharTokenizer(), 2, 16, "train", rank=r, resume_state=rank_loader_state(gathered, r, 2), **kw), 5)
        for (x0, y0, _), (x1, y1, _) in zip(straight[3:], resumed):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
