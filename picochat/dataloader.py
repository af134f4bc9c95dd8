"""
Pretraining dataloader: BOS-aligned best-fit packing with EXACT resume.

Every row of a (B, T) batch is T+1 tokens built from whole documents, each starting with <|bos|>:
the longest buffered document that still fits is placed whole; when none fits, the shortest one is
cropped to fill the row (its tail is discarded). No padding, 100% of positions used. inputs = row[:-1],
targets = row[1:]. The stream is infinite and multi-epoch.

split_docs=True (off by default; the reference crops): a document longer than a row is first cut into
row-sized pieces - the first T+1 tokens, then <|bos|> + the next T tokens, and so on - which are packed like
documents. At the reference's T=2048 cropping discards ~35% of tokens; at a CPU demo's T=256 most of the
corpus is multi-thousand-token documents, so cropping would train on their first 256 tokens only and burn
through the data several times faster (we measured epoch 4 by step 770 of the CPU demo).

Distributed: the row groups of the split's files are numbered globally in file order; rank r of W reads
row groups r, r+W, r+2W, ... (so with few, single-row-group shards every rank still gets data).

Resume: each batch comes with a small JSON-serializable state describing the position right AFTER that
batch: the stream cursor (epoch, file, row group, next document) and the packing buffer as an ordered
list of references [file, row_group, doc, piece]. Every buffered entry is a whole, never-used document (or
piece of one), so re-reading and re-tokenizing the references restores the buffer exactly, and a loader
built with that state yields exactly the batches the uninterrupted run would have yielded.
With several ranks, each has its own state (train_loop.gather_loader_states collects them for the checkpoint,
train_loop.rank_loader_state gives each rank its own back).

State format (version 2, one rank; ~20 KB of JSON at buffer_size=1000):
    {"version": 2, "split": "train", "rank": r, "world_size": W,
     "epoch": e (1-based), "file": f, "row_group": g, "doc": d,   # next document to read: doc d of (f, g)
     "buffer": [[f, g, d, p], ...],                               # buffered documents (piece p), in buffer order
     "buffer_size": 1000, "tokenizer_batch_size": 128,            # decide the refill chunking: kept on resume
     "split_docs": false,                                         # decides the pieces: kept on resume
     "num_files": n, "B": B, "T": T,                              # for mismatch warnings
     "stats": {"batches", "tokens", "docs", "crops", "cropped_tokens", "pieces"}}   # cumulative statistics
(f is an index into the split's sorted file list, g a row group of that file, d a row within it.)

Reading, tokenization and packing run in a background thread (tokenization itself is multithreaded
in the tokenizer), a few batches ahead of training; batches are pinned and copied non-blocking only
when CUDA is in use.

Example:
    from picochat.tokenizer import get_tokenizer
    from picochat.dataloader import pretrain_batches
    loader = pretrain_batches(get_tokenizer(), B=8, T=1024, split="train", device="cpu")
    x, y, state = next(loader)        # save `state` (JSON) with a checkpoint, pass it as resume_state later
"""
import queue
import threading

import numpy as np
import torch

from picochat import dataset
from picochat.common import get_dist_info, logger

STATE_VERSION = 2


def assign_row_groups(sizes, rank: int, world_size: int) -> list:
    """The (file, row_group) pairs rank `rank` reads, in stream order. sizes: per file, rows per row group.
    Global striding: disjoint across ranks, union = all row groups. With fewer row groups than ranks, the
    extra ranks re-read one (duplicated data, with a warning) instead of hanging with nothing to read."""
    flat = [(f, g) for f, rgs in enumerate(sizes) for g in range(len(rgs))]
    if not flat:
        raise ValueError("the split has no row groups to read")
    mine = flat[rank::world_size]
    if not mine:
        key = (rank, world_size, len(flat))
        if key not in _warned:  # once per process: the val loader is rebuilt at every evaluation
            _warned.add(key)
            logger.warning(f"rank {rank}: only {len(flat)} row groups for {world_size} ranks; this rank re-reads "
                           f"row group {flat[rank % len(flat)]} (duplicated data). Use more or smaller row groups.")
        mine = [flat[rank % len(flat)]]
    return mine


_warned = set()


class _Stopped(Exception):
    """The consumer went away: the producer abandons the batch in progress."""


class _DocStream:
    """Infinite cursor over this rank's documents: yields chunks of (refs, texts), one row group slice at a
    time, so the chunking depends only on the cursor (needed for exact resume)."""

    def __init__(self, files, sizes, mine, chunk_size, epoch=1, file=None, row_group=None, doc=0):
        self.files, self.sizes, self.mine, self.chunk_size = files, sizes, mine, chunk_size
        self.index = {fg: i for i, fg in enumerate(mine)}
        if sum(sizes[f][g] for f, g in mine) == 0:
            raise ValueError(f"this rank's row groups in {files[0].parent} hold no documents")
        self.epoch, self.doc = epoch, doc
        if file is None:
            self.pos = 0
        else:
            if (file, row_group) not in self.index:
                raise ValueError(f"resume state points at file {file} row group {row_group}, which this rank does "
                                 f"not read; the data directory or world size changed since the state was saved")
            self.pos = self.index[(file, row_group)]
        self._pf_cache = {}
        self._texts_key, self._texts = None, None
        self._normalize()

    def _normalize(self):
        # move past exhausted (or empty) row groups, wrapping into the next epoch
        while self.doc >= self.sizes[self.mine[self.pos][0]][self.mine[self.pos][1]]:
            self.doc = 0
            self.pos += 1
            if self.pos == len(self.mine):
                self.pos = 0
                self.epoch += 1

    def texts(self, f, g):
        if self._texts_key != (f, g):
            if f not in self._pf_cache:
                if len(self._pf_cache) >= 8:
                    self._pf_cache.clear()
                self._pf_cache[f] = dataset.open_parquet(self.files[f])
            self._texts = dataset.read_row_group(self._pf_cache[f], g, self.files[f])
            self._texts_key = (f, g)
            if len(self._texts) != self.sizes[f][g]:
                raise ValueError(f"{self.files[f]} row group {g} changed while reading")
        return self._texts

    def cursor(self):
        f, g = self.mine[self.pos]
        return {"epoch": self.epoch, "file": f, "row_group": g, "doc": self.doc}

    def next_chunk(self):
        f, g = self.mine[self.pos]
        texts = self.texts(f, g)
        end = min(self.doc + self.chunk_size, len(texts))
        refs = [(f, g, d) for d in range(self.doc, end)]
        chunk = texts[self.doc:end]
        self.doc = end
        self._normalize()
        return refs, chunk


def split_pieces(tok: np.ndarray, T: int, bos: int) -> list:
    """A tokenized document (BOS first) as pieces of at most T+1 tokens, each starting with BOS: the first
    T+1 tokens, then BOS + the next T tokens, ... Concatenating the pieces without their added BOS gives tok."""
    if len(tok) <= T + 1:
        return [tok]
    pieces = [tok[:T + 1]]
    for start in range(T + 1, len(tok), T):
        pieces.append(np.concatenate(([bos], tok[start:start + T])))
    return pieces


class _Packer:
    """Best-fit packing over a buffer of tokenized whole documents or pieces (runs in the producer thread)."""

    def __init__(self, tokenizer, stream, B, T, buffer_size, tokenizer_threads, stats=None, split_docs=False):
        self.tokenizer, self.stream = tokenizer, stream
        self.B, self.T = B, T
        self.buffer_size, self.threads, self.split_docs = buffer_size, tokenizer_threads, split_docs
        self.bos = tokenizer.get_bos_token_id()
        self.refs, self.toks, self.lens = [], [], []  # parallel lists, buffer order
        self.stop = None  # threading.Event set by the consumer; checked between tokenizer calls
        self.stats = {"batches": 0, "tokens": 0, "docs": 0, "crops": 0, "cropped_tokens": 0, "pieces": 0}
        self.stats.update(stats or {})

    def _pieces(self, tok):
        return split_pieces(tok, self.T, self.bos) if self.split_docs else [tok]

    def _encode(self, texts):
        ids = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.threads)
        return [np.asarray(t, dtype=np.int64) for t in ids]

    def _append(self, refs, texts):
        for (f, g, d), tok in zip(refs, self._encode(texts)):
            pieces = self._pieces(tok)
            self.stats["pieces"] += len(pieces) - 1
            for p, piece in enumerate(pieces):
                self.refs.append((f, g, d, p))
                self.toks.append(piece)
                self.lens.append(len(piece))

    def restore(self, refs):
        """Refill the buffer with the referenced documents (pieces), in the given order."""
        refs = [tuple(r) for r in refs]
        docs = sorted({(f, g, d) for f, g, d, _ in refs})
        wanted = {}  # read each row group once, keep only the referenced documents' texts
        for f, g in sorted({(f, g) for f, g, _ in docs}):
            rg_texts = self.stream.texts(f, g)
            for _, _, d in (r for r in docs if r[:2] == (f, g)):
                if not 0 <= d < len(rg_texts):
                    raise ValueError(f"resume state references doc {d} of {self.stream.files[f]} row group {g}, "
                                     f"which has {len(rg_texts)}; the data changed since the state was saved")
                wanted[(f, g, d)] = rg_texts[d]
        pieces = {}
        for i in range(0, len(docs), 1024):  # tokenize in slices to bound peak memory
            for ref, tok in zip(docs[i:i + 1024], self._encode([wanted[r] for r in docs[i:i + 1024]])):
                pieces[ref] = self._pieces(tok)
        for f, g, d, p in refs:
            if p >= len(pieces[(f, g, d)]):
                raise ValueError(f"resume state references piece {p} of doc {d} of {self.stream.files[f]} row "
                                 f"group {g}, which has {len(pieces[(f, g, d)])}; the data or tokenizer changed")
            self.refs.append((f, g, d, p))
            self.toks.append(pieces[(f, g, d)][p])
            self.lens.append(len(self.toks[-1]))

    def _refill(self):
        while len(self.lens) < self.buffer_size:
            if self.stop is not None and self.stop.is_set():
                raise _Stopped
            self._append(*self.stream.next_chunk())

    def _take(self, i):
        self.refs.pop(i)
        self.lens.pop(i)
        return self.toks.pop(i)

    def next_batch(self) -> np.ndarray:
        B, T = self.B, self.T
        rows = np.empty((B, T + 1), dtype=np.int64)
        filled = 0
        for b in range(B):
            pos = 0
            while pos < T + 1:
                self._refill()
                remaining = T + 1 - pos
                # the longest document that fits whole; first index wins ties (reference behaviour)
                best, best_i = 0, -1
                for i, n in enumerate(self.lens):
                    if best < n <= remaining:
                        best, best_i = n, i
                        if n == remaining:
                            break
                if best_i >= 0:
                    rows[b, pos:pos + best] = self._take(best_i)
                    pos += best
                    self.stats["docs"] += 1
                else:  # nothing fits: crop the shortest document to fill the row, discard its tail
                    j = self.lens.index(min(self.lens))
                    tok = self._take(j)
                    rows[b, pos:] = tok[:remaining]
                    self.stats["crops"] += 1
                    self.stats["cropped_tokens"] += len(tok) - remaining
                    pos = T + 1
            filled += pos
        self.stats["batches"] += 1
        self.stats["tokens"] += filled
        return rows


def crop_fraction(stats) -> float:
    """Fraction of the consumed documents' tokens that were cropped away (reference: ~35% at T=2048)."""
    total = stats["tokens"] + stats["cropped_tokens"]
    return stats["cropped_tokens"] / total if total else 0.0


def _select_state(resume_state, rank, world_size):
    if resume_state is None:
        return None
    if resume_state.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported dataloader state version {resume_state.get('version')!r} (this picochat reads "
                         f"version {STATE_VERSION})")
    if (resume_state["rank"], resume_state["world_size"]) != (rank, world_size):
        raise ValueError(f"dataloader state belongs to rank {resume_state['rank']} of {resume_state['world_size']}, "
                         f"this is rank {rank} of {world_size}: pass each rank its own state")
    return resume_state


class _Error:
    def __init__(self, exc):
        self.exc = exc


class DistributedBestFitLoader:
    """Iterable of (inputs, targets, state); see the module docstring. rank/world_size default to torchrun's."""

    def __init__(self, tokenizer, B, T, split, device="cpu", data_dir=None, resume_state=None, buffer_size=1000,
                 tokenizer_threads=4, tokenizer_batch_size=128, rank=None, world_size=None, prefetch=2,
                 split_docs=False):
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B} T={T}")
        _, env_rank, _, env_world = get_dist_info()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        self.tokenizer, self.B, self.T, self.split = tokenizer, B, T, split
        self.device = torch.device(device)
        self.files = dataset.split_files(split, data_dir)
        self.sizes = dataset.row_group_sizes(self.files)
        self.mine = assign_row_groups(self.sizes, self.rank, self.world_size)
        self.resume_state = _select_state(resume_state, self.rank, self.world_size)
        self.buffer_size, self.tokenizer_batch_size, self.split_docs = buffer_size, tokenizer_batch_size, split_docs
        if self.resume_state is not None:
            s = self.resume_state
            if s["split"] != split:
                raise ValueError(f"dataloader state is for split {s['split']!r}, not {split!r}")
            # chunking and buffer size decide which documents enter the buffer: keep the saved ones
            if (s["buffer_size"], s["tokenizer_batch_size"]) != (buffer_size, tokenizer_batch_size):
                logger.warning(f"resuming with the saved buffer_size={s['buffer_size']} and tokenizer_batch_size="
                               f"{s['tokenizer_batch_size']} (not {buffer_size}/{tokenizer_batch_size}) to keep "
                               f"the token stream identical")
                self.buffer_size, self.tokenizer_batch_size = s["buffer_size"], s["tokenizer_batch_size"]
            if s.get("split_docs", False) != split_docs:
                logger.warning(f"resuming with the saved split_docs={s.get('split_docs', False)} (not {split_docs}) to keep "
                               f"the token stream identical; start a new run to change it")
                self.split_docs = s.get("split_docs", False)
            if s["num_files"] != len(self.files):
                logger.warning(f"the {split} split had {s['num_files']} files when the state was saved, now "
                               f"{len(self.files)}: the stream continues, but later epochs differ")
            if (s["B"], s["T"]) != (B, T):
                logger.warning(f"resuming with B={B} T={T} instead of B={s['B']} T={s['T']}: the stream continues "
                               f"from the saved position, but batches differ from the original run")
        self.tokenizer_threads, self.prefetch = tokenizer_threads, max(1, prefetch)
        self.use_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.last_state = self.resume_state

    @property
    def stats(self) -> dict:
        """Packing statistics up to the last yielded batch, with crop_fraction and utilisation."""
        s = {"batches": 0, "tokens": 0, "docs": 0, "crops": 0, "cropped_tokens": 0, "pieces": 0}
        s.update(self.last_state["stats"] if self.last_state else {})
        s["crop_fraction"] = crop_fraction(s)
        positions = s["batches"] * self.B * (self.T + 1)
        s["utilisation"] = s["tokens"] / positions if positions else 0.0
        return s

    # -- producer (background thread) -------------------------------------------------------------

    def _make_packer(self):
        s = self.resume_state
        cursor = {} if s is None else {k: s[k] for k in ("epoch", "file", "row_group", "doc")}
        stream = _DocStream(self.files, self.sizes, self.mine, self.tokenizer_batch_size, **cursor)
        packer = _Packer(self.tokenizer, stream, self.B, self.T, self.buffer_size, self.tokenizer_threads,
                         stats=None if s is None else s["stats"], split_docs=self.split_docs)
        if s is not None:
            packer.restore(s["buffer"])
        return packer

    def _state(self, packer):
        # snapshot at production time: the position right after the batch just packed
        return {"version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                **packer.stream.cursor(), "buffer": [list(r) for r in packer.refs],
                "buffer_size": self.buffer_size, "tokenizer_batch_size": self.tokenizer_batch_size,
                "split_docs": self.split_docs, "num_files": len(self.files), "B": self.B, "T": self.T, "stats": dict(packer.stats)}

    def _to_tensors(self, rows):
        rows = torch.from_numpy(rows)
        if self.use_cuda:
            # [inputs | targets] in one pinned buffer -> one host-to-device copy
            pinned = torch.empty((2, self.B, self.T), dtype=torch.int64, pin_memory=True)
            pinned[0].copy_(rows[:, :-1])
            pinned[1].copy_(rows[:, 1:])
            return pinned
        return torch.stack([rows[:, :-1], rows[:, 1:]])

    def _produce(self, q, stop):
        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False
        try:
            packer = self._make_packer()
            packer.stop = stop
            while not stop.is_set():
                rows = packer.next_batch()
                if not put((self._to_tensors(rows), self._state(packer))):
                    return
        except _Stopped:
            return
        except BaseException as e:  # hand the error to the consumer instead of hanging it
            put(_Error(e))

    # -- consumer ---------------------------------------------------------------------------------

    def __iter__(self):
        q = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(q, stop), daemon=True, name="picochat-dataloader")
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, _Error):
                    raise item.exc
                both, state = item
                if self.device.type != "cpu":
                    both = both.to(self.device, non_blocking=self.use_cuda)
                self.last_state = state
                yield both[0], both[1], state
        finally:
            stop.set()
            thread.join(timeout=1.0)  # it stops at its next tokenizer call; no need to wait longer


def pretrain_batches(tokenizer, B, T, split, device="cpu", data_dir=None, resume_state=None, buffer_size=1000,
                     tokenizer_threads=4, tokenizer_batch_size=128, **kwargs):
    """Infinite iterator of (inputs, targets, state); inputs/targets int64 (B, T) on `device`."""
    return iter(DistributedBestFitLoader(tokenizer, B, T, split, device, data_dir, resume_state, buffer_size,
                                         tokenizer_threads, tokenizer_batch_size, **kwargs))
