"""Batches of training windows from a `TokenShard`, shuffled per epoch, resumable exactly.

Windows. Window `w` is tokens `[w*T, w*T + T + 1)` of the split (T = seq_len): inputs
`x = window[:-1]`, targets `y = window[1:]`. Windows do not overlap except for the one
token a target shares with the next window's input; there are `(n_tokens - 1) // T`.

Document-aligned windows (`doc_aligned`, nanochat's batch starts). Every document (the split's
start, and each position right after an end-of-document token) opens a window, and its next
windows follow every T tokens until the document's end: no document starts mid-window, and a
window's first tokens never see the end of the document before. A document's last window runs
on into the next one, whose own first window reads those tokens again (about T/2 tokens read
twice per document). Window `w` then starts at `doc_window_starts(...)[w]`; the rest is as below.

Epochs. Epoch `e` visits the windows in the order `perm_e`, a permutation drawn from
`numpy.random.default_rng([seed, e])` (never the global RNG). The order is cut into
global batches of `G = batch_size * world_size` windows:

    global batch k of epoch e  =  perm_e[k*G : (k+1)*G]

and process `rank` of `world_size` takes the strided slice

    micro-batch (rank r)       =  perm_e[k*G + r : (k+1)*G : world_size]      (batch_size rows)

so the ranks of one step together hold exactly the global batch that one process with
`batch_size * world_size` would get. With gradient accumulation over A micro-batches, one
optimizer step consumes `perm_e[s*A*G : (s+1)*A*G]` — a set of windows that depends only on
`A * G`, so 2 processes x A micro-batches of B train on the same windows per step as
1 process x 2A micro-batches of B (or 1 process x A of 2B). Pass `grad_accum=A` so that
an epoch is a whole number of optimizer steps: `batches_per_epoch = floor(n_windows /
(A*G)) * A`; the `n_windows mod (A*G)` windows at the tail of each epoch's permutation are
skipped in that epoch (different ones every epoch). Equal `A*G` gives equal epochs.

Epoch boundaries. `next_batch()` returns `(x, y)`; right after it returned the last batch
of an epoch, `epoch_done` is True (and `epoch` still names the finished epoch). The next
call starts epoch `epoch + 1`.

Domain labels (governance). `next_batch_with_domains()` returns `(x, y, d)` where `d[b, t]`
is the class of the domain whose range holds input token `x[b, t]` (class i =
`domain_classes[i]`, default the shard's domains in order; -1 for a domain not listed). It
advances the loader exactly like `next_batch()`.

Window control tokens (governance). With `control_ids` (domain -> the id of its
`<|domain:NAME|>` token) and `control_window_prob` p > 0, the first input token of a chosen
window is replaced by the control token of the domain its text starts in (the domain of the
window's second token), so the model learns what the token means from every chosen window,
not only from the few documents whose start it happens to read (shards.py's
`control_token_prob`: a control token per document, a few hundred in a corpus of books).
Window `w` is chosen when `window_uniform(seed, w) < p`: a pure function of the window, so
the batches stay exactly resumable and identical with or without prefetch. Targets are
unchanged; the evaluation windows never get one.

Loss mask (chat fine-tuning). A shard with a mask (`TokenShard.mask`, simone/data/chat_data.py)
gives targets of -1, which the loss ignores, where the mask is 0: the same windows and order,
only what is learned from them differs. Evaluation batches are masked the same way.

Resume. `state_dict()` is `{epoch, position, seed, seq_len, global_batch, ...}` in plain
ints; a loader given it by `load_state_dict` returns exactly the batches the original
would have returned next.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from simone.data.shards import TokenShard


def epoch_permutation(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of `epoch`: a permutation of `range(n_windows)` from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def window_uniform(seed: int, windows: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per window id, fixed by (seed, id): a splitmix64 hash."""
    with np.errstate(over="ignore"):
        z = windows.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def doc_window_starts(tokens: np.ndarray, eod_id: int, seq_len: int, chunk: int = 1 << 24) -> np.ndarray:
    """Start positions of the document-aligned windows of `tokens` (see the module doc), in
    order: each document's start and every `seq_len` tokens after it inside the document, for
    windows of seq_len + 1 tokens that fit. Reads the tokens `chunk` at a time (a memmap)."""
    n = len(tokens)
    after_eod = [np.flatnonzero(np.asarray(tokens[i : i + chunk]) == eod_id) + (i + 1) for i in range(0, n, chunk)]
    bounds = np.unique(np.concatenate([[0], *after_eod, [n]]).astype(np.int64))  # doc starts, then the end
    per_doc = -(-np.diff(bounds) // seq_len)  # windows starting in each document
    nth = np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)  # k-th of its document
    starts = np.repeat(bounds[:-1], per_doc) + nth * seq_len
    return starts[starts + seq_len + 1 <= n]


def _gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """Rows `tokens[s : s+length]` for each start, as an int64 tensor [len(starts), length]."""
    rows = tokens[starts[:, None] + np.arange(length)[None, :]]  # fancy indexing reads only these
    return torch.from_numpy(rows.astype(np.int64))


def _masked_targets(shard: TokenShard, buf: torch.Tensor, starts: np.ndarray) -> torch.Tensor | None:
    """The targets `buf[:, 1:]` with -1 (ignored by the loss) where the shard's loss mask is 0;
    None for a shard without a mask."""
    if shard.mask is None:
        return None
    keep = _gather(shard.mask, starts + 1, buf.size(1) - 1).bool()
    return buf[:, 1:].masked_fill(~keep, -1)


class BatchLoader:
    """Shuffled, rank-sharded, exactly resumable batches of (x, y) from one TokenShard."""

    def __init__(
        self,
        shard: TokenShard,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        grad_accum: int = 1,
        prefetch: bool | None = None,
        domain_classes: list[str] | None = None,
        control_ids: dict[str, int] | None = None,
        control_window_prob: float = 0.0,
        doc_aligned: bool = False,
    ):
        if not 0.0 <= control_window_prob <= 1.0:
            raise ValueError(f"data.control_window_prob={control_window_prob}: must be in [0, 1]")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or seq_len < 1 or grad_accum < 1:
            raise ValueError("batch_size, seq_len and grad_accum must be >= 1")
        self.shard = shard
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.pin_memory = on_cuda if pin_memory is None else pin_memory
        self.global_batch = batch_size * world_size
        self.doc_aligned = doc_aligned
        # window w starts at _starts[w] (document-aligned), or at w * seq_len (None)
        self._starts = doc_window_starts(shard.tokens, shard.eod_id, seq_len) if doc_aligned else None
        self.n_windows = max(0, (shard.n_tokens - 1) // seq_len) if self._starts is None else len(self._starts)
        step_windows = self.global_batch * grad_accum
        self.batches_per_epoch = (self.n_windows // step_windows) * grad_accum
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{shard.path}: {shard.n_tokens} tokens make {self.n_windows} windows of "
                f"{seq_len}+1 tokens, fewer than one optimizer step needs "
                f"(batch_size {batch_size} x world_size {world_size} x grad_accum {grad_accum} "
                f"= {step_windows}); use a smaller batch_size or seq_len, or more data"
            )
        self.epoch = 0
        self.position = 0  # batches of `epoch` already returned
        self._perm_cache: tuple[int, np.ndarray] | None = None
        # Background prefetch of the next batch (CUDA by default). The batch at a given
        # (epoch, position) is a pure function of them, so prefetching changes no result.
        self._prefetch = on_cuda if prefetch is None else prefetch
        self._pool = ThreadPoolExecutor(max_workers=1) if self._prefetch else None
        self._pending: tuple[tuple[int, int], Future] | None = None
        # Domain lookup: range starts in token order, the class of each range and its control
        # token id (-1: not a policy class / no control token).
        classes = list(shard.domains if domain_classes is None else domain_classes)
        ranges = sorted((shard.domain_range(d)[0], d) for d in shard.domains)
        self._range_starts = np.array([start for start, _ in ranges], dtype=np.int64)
        self._range_class = np.array([classes.index(d) if d in classes else -1 for _, d in ranges], dtype=np.int64)
        self._range_control = np.array([(control_ids or {}).get(d, -1) for _, d in ranges], dtype=np.int64)
        self.control_window_prob = control_window_prob if control_ids else 0.0

    # ------------------------------------------------------------------ order
    def _permutation(self, epoch: int) -> np.ndarray:
        # The cache is one (epoch, perm) tuple replaced in a single assignment, so the
        # prefetch thread and the caller can never see one epoch's number with another's order.
        cached = self._perm_cache
        if cached is None or cached[0] != epoch:
            cached = (epoch, epoch_permutation(self.n_windows, self.seed, epoch))
            self._perm_cache = cached
        return cached[1]

    def window_ids(self, epoch: int, position: int) -> np.ndarray:
        """Window numbers of this rank's micro-batch `position` of `epoch` (see module doc)."""
        perm = self._permutation(epoch)
        base = position * self.global_batch
        return perm[base + self.rank : base + self.global_batch : self.world_size]

    def window_starts(self, windows: np.ndarray) -> np.ndarray:
        """Token positions where the windows `windows` (ids) start."""
        return windows * self.seq_len if self._starts is None else self._starts[windows]

    def _host_batch(self, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The micro-batch's windows [B, T+1], and its targets [B, T] where the shard has a
        loss mask (else None: the window's own tokens)."""
        windows = self.window_ids(epoch, position)
        starts = self.window_starts(windows)
        buf = _gather(self.shard.tokens, starts, self.seq_len + 1)
        targets = _masked_targets(self.shard, buf, starts)
        if self.control_window_prob > 0 and len(self._range_starts):
            rows = np.flatnonzero(window_uniform(self.seed, windows) < self.control_window_prob)
            which = np.searchsorted(self._range_starts, starts[rows] + 1, side="right") - 1
            ids = np.where(which >= 0, self._range_control[which.clip(min=0)], -1)
            rows, ids = rows[ids >= 0], ids[ids >= 0]
            buf[torch.from_numpy(rows), 0] = torch.from_numpy(ids)
        if self.pin_memory:
            return buf.pin_memory(), None if targets is None else targets.pin_memory()
        return buf, targets

    # ------------------------------------------------------------------ iteration
    @property
    def epoch_done(self) -> bool:
        """True right after the last batch of `epoch` was returned."""
        return self.position >= self.batches_per_epoch

    @property
    def epoch_progress(self) -> float:
        """Fraction of the current epoch's batches already returned (0.0 .. 1.0)."""
        return self.position / self.batches_per_epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch `(x, y)`, int64 tensors [batch_size, seq_len] on `device`."""
        return self._next()[:2]

    def next_batch_with_domains(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(x, y, d)`: the next micro-batch and each input token's domain class [B, T]."""
        x, y, key = self._next()
        positions = self.window_starts(self.window_ids(*key))[:, None] + np.arange(self.seq_len)[None, :]
        if len(self._range_starts):
            which = np.searchsorted(self._range_starts, positions, side="right") - 1
            labels = np.where(which >= 0, self._range_class[which.clip(min=0)], -1)
        else:
            labels = np.full(positions.shape, -1, dtype=np.int64)
        d = torch.from_numpy(labels.astype(np.int64))
        if self.device.type != "cpu":
            d = d.to(self.device, non_blocking=False)
        return x, y, d

    def _next(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        if self.epoch_done:
            self.epoch += 1
            self.position = 0
        key = (self.epoch, self.position)
        if self._pending is not None and self._pending[0] == key:
            buf, targets = self._pending[1].result()
        else:
            buf, targets = self._host_batch(*key)
        self._pending = None
        self.position += 1
        if self._pool is not None:
            nxt = (self.epoch + 1, 0) if self.epoch_done else (self.epoch, self.position)
            self._pending = (nxt, self._pool.submit(self._host_batch, *nxt))
        if self.device.type != "cpu":
            buf = buf.to(self.device, non_blocking=self.pin_memory)
            targets = None if targets is None else targets.to(self.device, non_blocking=self.pin_memory)
        return buf[:, :-1].contiguous(), (buf[:, 1:] if targets is None else targets).contiguous(), key

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Plain-int state; `load_state_dict` of it continues with the same batches."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "n_windows": self.n_windows,
            **({"doc_aligned": True} if self.doc_aligned else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. Raises ValueError if it was made for other data or
        another seed/seq_len, or if its position is not a whole number of this loader's
        global batches (after a change of batch_size x world_size)."""
        if bool(state.get("doc_aligned")) != self.doc_aligned:
            raise ValueError(f"loader state has doc_aligned={not self.doc_aligned}, this loader {self.doc_aligned}")
        for key in ("seed", "seq_len", "n_windows"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]}, this loader has {getattr(self, key)}")
        windows_done = int(state["position"]) * int(state.get("global_batch", self.global_batch))
        if windows_done % self.global_batch:
            raise ValueError(
                f"loader state is {windows_done} windows into epoch {state['epoch']}, not a "
                f"multiple of this loader's global batch {self.global_batch}"
            )
        self.epoch = int(state["epoch"])
        self.position = windows_done // self.global_batch
        self._pending = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._prefetch = False

    def __del__(self) -> None:
        # a destructor must not raise (at interpreter exit the pool may be half gone)
        with contextlib.suppress(Exception):
            self.close()


# ----------------------------------------------------------------------------- evaluation


def eval_window_starts(shard: TokenShard, domain: str | None, seq_len: int, n_windows: int) -> tuple[np.ndarray, int]:
    """Start positions of `n_windows` windows spread evenly over a domain's range (or the
    whole split for `domain=None`), and the window length (seq_len, or shorter when the
    range is too small for one full window)."""
    lo, hi = (0, shard.n_tokens) if domain is None else shard.domain_range(domain)
    available = (hi - lo - 1) // seq_len
    if available == 0:
        # A range shorter than one window still gets evaluated: one shorter window.
        length = hi - lo - 1
        return (np.array([lo], dtype=np.int64), length) if length >= 1 else (np.zeros(0, np.int64), 0)
    n = min(n_windows, available)
    # window i of n: the (i * available // n)-th whole window of the range — distinct, in order
    picks = np.arange(n, dtype=np.int64) * available // n
    return lo + picks * seq_len, seq_len


def eval_windows(
    shard: TokenShard,
    domain: str | None,
    seq_len: int,
    max_batches: int,
    batch_size: int,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches `(x, y)` for one domain (or the whole split).

    Takes up to `max_batches * batch_size` windows evenly spaced over the domain's range;
    the last batch may be smaller. Every window lies inside the range, so the loss is the
    domain's own.
    """
    starts, length = eval_window_starts(shard, domain, seq_len, max_batches * batch_size)
    device = torch.device(device)
    for i in range(0, len(starts), batch_size):
        buf = _gather(shard.tokens, starts[i : i + batch_size], length + 1)
        targets = _masked_targets(shard, buf, starts[i : i + batch_size])
        if device.type != "cpu":
            buf = buf.to(device)
            targets = None if targets is None else targets.to(device)
        yield buf[:, :-1].contiguous(), (buf[:, 1:] if targets is None else targets).contiguous()


def bits_per_byte(mean_loss_nats: float, shard: TokenShard, domain: str | None = None) -> float:
    """Bits per UTF-8 byte from a mean cross-entropy (nats per token) on `shard`/`domain`."""
    bytes_per_token = shard.bytes_per_token(domain)
    if bytes_per_token <= 0:
        return float("nan")
    return mean_loss_nats / math.log(2) / bytes_per_token
