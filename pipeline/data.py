"""Training batches streamed from teacher shards.

The shards are read with `datasets` (Parquet, `streaming=True`) through a seeded shuffle buffer, so host
memory is bounded by the buffer, not the data. Row batches of that one global stream are dealt round-robin:
batch b goes to rank b % W and, on that rank, to DataLoader worker (b // W) % workers. Every rank therefore
gets the same number of batches (DDP needs that; splitting by shard does not guarantee it), the order does
not depend on the number of workers, and a resume skips consumed batches without decoding their images.

A batch encodes each unique image (by file) and caption (by text) once. For B queries with N hard negatives:

| key                   | shape          | meaning                                                    |
| --------------------- | -------------- | ---------------------------------------------------------- |
| pixel_values          | [Ui, 3, H, W]  | the batch's unique images                                  |
| input_ids, attention_mask | [Ut, L]    | the batch's unique captions                                |
| pair_image, pair_text | [B]            | (query, positive) pairs for the contrastive loss           |
| pair_positive_mask    | [B, B]         | True where pair j's caption is a caption of pair i's image file (shared captions included) |
| query_is_image        | [B]            | True for i2t rows (query image, candidate texts)           |
| query, positive       | [B]            | index into images (i2t query) or texts (t2i query), etc.   |
| candidates            | [B, N]         | index of each hard negative in the other modality          |
| candidate_mask        | [B, N]         | True = a real negative (not padding, not a false negative) |
| teacher, teacher_positive | [B, N], [B] | teacher scores of negatives and of the chosen positive    |
| false_negatives       | []             | candidates dropped as identical to a positive              |
| dropped_by_margin     | []             | candidates dropped because the teacher scores them above the positive by more than `max_teacher_margin` |
| negatives             | []             | list entries left after those two drops                    |
| negatives_in_batch    | []             | of these, entries whose image or caption is a query or positive of the batch |

A list entry outside the batch's pairs costs one more image or caption to encode; with `outside="drop"` it is
left out of the list instead (the lists then hold only in-batch entries, and the batch encodes its pairs alone);
with `outside_budget` N, only N of those images and captions are encoded (the ones listed most often in the
batch, or with `outside_priority` "teacher-rank" or "teacher-rank-steep" those whose listings rank highest by
the teacher), and the entries of the others are left out.

False negatives: a mined candidate that is really a match is never a negative. An i2t candidate caption is
one when its text is identical to one of the query image's own captions, or when it belongs to the same image
file; a t2i candidate image is one when it is the query's image file, or when the query caption is
identical to one of its captions. With `max_teacher_margin`, a candidate the teacher scores above the
positive by more than that margin is dropped too.
"""
from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .errors import PipelineError
from .models import load_image, pad_images

COLUMNS = ["direction", "query_id", "positive_ids", "candidate_ids", "teacher_scores", "positive_teacher_scores"]
# how a listing at rank r (by teacher score in its row, 0 = the hardest) weighs, by outside_priority; "listed": 1
RANK_WEIGHT = {"teacher-rank": lambda r: 1.0 / math.sqrt(1 + r), "teacher-rank-steep": lambda r: 1.0 / (1 + r)}
PRIORITIES = ("listed", *RANK_WEIGHT)


def teacher_stream(files: Sequence[Path], seed: int, epoch: int, shuffle_buffer: int,
                   columns: Sequence[str] = COLUMNS):
    import datasets

    # `datasets` sleeps this long at the end of every pass over Parquet (letting Arrow reader threads wind
    # down before a possible interpreter exit). Training goes on after each pass, so a short grace suffices;
    # the default 5 s would cost more than a whole epoch on small data.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = min(datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN, 0.5)
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
    ds = ds.select_columns(list(columns))
    if shuffle_buffer > 1:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
        ds.set_epoch(epoch)
    return ds


def packed_rows(files: Sequence[Path], columns: Sequence[str] = COLUMNS):
    """The teacher shards' rows as one Arrow table, in shard order (the row numbers a packing order indexes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f, columns=list(columns)) for f in files])


def list_rows(files: Sequence[Path], matches: "Matches", num_negatives: int):
    """(rows [R], cand_rows [R, N]) of the teacher shards for `pipeline.packing`: each row is its own unit, and
    a list entry points at the row whose query it is (an i2t row's candidate caption at that caption's t2i row, a
    t2i row's candidate image at that image's i2t row), so a batch holding that row holds the entry's image or
    caption as a pair. False negatives (never negatives) and entries that are no query here are -1."""
    import numpy as np

    table = packed_rows(files, ("direction", "query_id", "positive_ids", "candidate_ids")).to_pydict()
    row_of = {(d, q): r for r, (d, q) in enumerate(zip(table["direction"], table["query_id"]))}
    cand_rows = np.full((len(row_of), num_negatives), -1, dtype=np.int64)
    for r, (d, q, pos, cs) in enumerate(zip(table["direction"], table["query_id"], table["positive_ids"],
                                            table["candidate_ids"])):
        i2t = d == "i2t"
        for j, c in enumerate(cs[:num_negatives]):
            if not matches.false_negative(i2t, q, pos[0], c):
                cand_rows[r, j] = row_of.get(("t2i" if i2t else "i2t", c), -1)
    return np.arange(len(cand_rows)), cand_rows


def pick(seed: int, epoch: int, query_id: str, n: int) -> int:
    """Which positive a row uses this epoch: a hash, so the choice survives a resume exactly."""
    return zlib.crc32(f"{seed}:{epoch}:{query_id}".encode()) % n


@dataclass(frozen=True)
class BatchSpec:
    """What a training batch is made of, and this process's share of the stream."""
    batch_size: int                        # queries per micro-batch
    num_negatives: int                     # the first N mined candidates of each row
    seed: int                              # shuffle and positive choice
    shuffle_buffer: int = 10000            # rows in the streaming shuffle buffer (without a packing order)
    outside: str = "encode"                # list entries that are no query or positive of the batch: encode, drop
    outside_budget: Optional[int] = None   # with "encode": at most this many of their images and captions
    outside_priority: str = "teacher-rank"  # which ones: by "teacher-rank" (-steep), or "listed" most often
    max_teacher_margin: Optional[float] = None  # drop candidates the teacher puts this far above the positive
    image_cache_mb: float = 512            # processed images kept per worker (LRU)
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class Processors:
    """The student's input side: how images and captions become tensors."""
    image_processor: Any
    tokenizer: Any
    max_length: int


class Matches:
    """What matches what in a corpus, by content: a caption matches an image file when its text is one of that
    file's captions (identical captions are one caption; two image ids of one file are one image)."""

    def __init__(self, corpus: Any):
        self.corpus = corpus
        self.image_row = {iid: i for i, iid in enumerate(corpus.image_ids)}
        self.text_row = {tid: i for i, tid in enumerate(corpus.text_ids)}
        self.text_image = corpus.text_image_rows()
        self.row_of_path: dict[str, int] = {}
        for i, path in enumerate(corpus.image_paths):
            self.row_of_path.setdefault(path, i)
        self.captions: dict[str, set[str]] = {}      # image file -> the texts of all its captions
        for text, img in zip(corpus.texts, self.text_image):
            self.captions.setdefault(corpus.image_paths[img], set()).add(text)

    def path(self, image_id: str) -> str:
        """The file of an image id."""
        return self.corpus.image_paths[self.image_row[image_id]]

    def text(self, text_id: str) -> str:
        """The text of a caption id."""
        return self.corpus.texts[self.text_row[text_id]]

    def false_negative(self, i2t: bool, query: str, positive: str, candidate: str) -> bool:
        """Whether a mined candidate really matches its query: an i2t candidate caption whose text is one of the
        query image's captions or whose image is the query's file; a t2i candidate image that is the positive's
        file or has the query caption's text among its captions."""
        c = self.corpus
        if i2t:
            path, t = c.image_paths[self.image_row[query]], self.text_row[candidate]
            return c.texts[t] in self.captions[path] or c.image_paths[self.text_image[t]] == path
        path = c.image_paths[self.image_row[candidate]]
        return (path == c.image_paths[self.image_row[positive]]
                or c.texts[self.text_row[query]] in self.captions.get(path, ()))

    def table(self, paths: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """[len(paths), len(texts)] bool: True where text j is a caption of image file i."""
        column = {t: j for j, t in enumerate(texts)}   # a text listed twice: its columns copy one
        out = torch.zeros(len(paths), len(texts), dtype=torch.bool)
        rows, cols = [], []
        for i, p in enumerate(paths):
            for t in self.captions.get(p, ()):
                if t in column:
                    rows.append(i), cols.append(column[t])
        out[rows, cols] = True
        first = torch.tensor([column[t] for t in texts], dtype=torch.long)
        return out[:, first]


class RowSource:
    """Epoch `epoch`'s row batches for this rank and loader worker: `batches` of them, the first `skip` passed
    over (resume), dealt as the module docstring says.

    Rows come from the shuffled stream, or, given `order` (`pipeline/packing.py`: a permutation of the shards'
    rows), batch b is rows order[b * batch_size : (b + 1) * batch_size], read from the shards held as one Arrow
    table (per loader worker, while it iterates; only this process's batches are materialised)."""

    def __init__(self, spec: BatchSpec, files: Sequence[Path], epoch: int, batches: int, skip: int = 0,
                 order: Optional[Any] = None, columns: Sequence[str] = COLUMNS):
        self.spec, self.files, self.epoch, self.batches, self.skip = spec, list(files), epoch, batches, skip
        self.order, self.columns = order, columns

    def __iter__(self):
        """Each of this worker's batches, as a dict of columns."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        spec = self.spec
        local = 0  # index among this rank's batches
        for b, rows in enumerate(self._row_batches()):
            if b % spec.world_size != spec.rank or local >= self.batches:
                continue
            if local >= self.skip and (local - self.skip) % workers == worker:
                yield rows()
            local += 1

    def built(self, build):
        """`build` of each of this worker's batches; a bad row is {"error": its one-line message}, re-raised by
        the training loop."""
        for rows in self:
            try:
                yield build(rows)
            except PipelineError as e:
                yield {"error": str(e)}

    def _row_batches(self):
        """Each batch's rows as a zero-argument callable (a packed batch is read only if this process builds it)."""
        spec = self.spec
        if self.order is None:
            stream = teacher_stream(self.files, spec.seed, self.epoch, spec.shuffle_buffer, self.columns)
            # The stream is read to its end even past `self.batches`: batches are skipped, never cut, so the
            # reader shuts down the same way every time.
            for rows in stream.iter(batch_size=spec.batch_size):
                yield lambda rows=rows: rows
            return
        table = packed_rows(self.files, self.columns)
        if table.num_rows != len(self.order):
            raise PipelineError(f"the packing order covers {len(self.order)} rows, the teacher shards hold "
                                f"{table.num_rows}")
        for start in range(0, len(self.order), spec.batch_size):
            yield lambda start=start: table.take(self.order[start:start + spec.batch_size]).to_pydict()


class ImageCache:
    """Processed images by corpus image row. Hard-negative images recur many times per epoch: processed ones
    are kept, least recently used out, up to `megabytes` (per loader worker: host memory stays bounded)."""

    def __init__(self, image_paths: Sequence[str], image_processor: Any, megabytes: float):
        self.image_paths, self.image_processor = image_paths, image_processor
        self.cache_bytes, self._cache, self._cached = int(megabytes * 2**20), OrderedDict(), 0

    def pixels(self, rows: list[int]) -> torch.Tensor:
        """[len(rows), 3, H, W]: cached images reused, the rest decoded and processed in one call."""
        return torch.stack(self.processed(rows))

    def processed(self, rows: list[int]) -> list[torch.Tensor]:
        """Each row's processed image [3, H, W]: cached ones reused, the rest decoded and processed in one call."""
        missing = [r for r in rows if r not in self._cache]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            pixels = self.image_processor(images=[load_image(self.image_paths[r]) for r in missing],
                                          return_tensors="pt")["pixel_values"]
            fresh = dict(zip(missing, pixels.clone().unbind(0)))  # own storage: a cached view would pin the batch
        out = [self._cache[r] if r in self._cache else fresh[r] for r in rows]
        for r in rows:
            if r in self._cache:
                self._cache.move_to_end(r)
        for r, px in fresh.items():
            if px.nbytes <= self.cache_bytes:
                self._cache[r] = px
                self._cached += px.nbytes
        while self._cached > self.cache_bytes:
            self._cached -= self._cache.popitem(last=False)[1].nbytes
        return out


class BatchItems:
    """The images and captions one batch encodes, each once, numbered in order of first use: an image by file
    (two ids of one file are one image), a caption by text (identical captions are one caption)."""

    def __init__(self, matches: Matches):
        self.matches, self.images, self.texts = matches, {}, {}   # image file / caption text -> batch index

    def image(self, image_id: str) -> int:
        return self.images.setdefault(self.matches.path(image_id), len(self.images))

    def text(self, text_id: str) -> int:
        return self.texts.setdefault(self.matches.text(text_id), len(self.texts))

    def image_rows(self) -> list[int]:
        """The corpus row of each image, in batch order (the first id of its file)."""
        return [self.matches.row_of_path[path] for path in self.images]

    def tokens(self, processors: Processors) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask [Ut, L] of the captions, in batch order."""
        return processors.tokenizer(list(self.texts), padding=True, truncation=True,
                                    max_length=processors.max_length, return_tensors="pt")

    def positives(self, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        """[len(image_index), len(text_index)] bool: True where caption text_index[j] is a caption of image file
        image_index[i] (indices into the batch's unique images and captions); only the pairs' rows are built."""
        images, per_image = torch.unique(image_index, return_inverse=True)
        texts, per_text = torch.unique(text_index, return_inverse=True)
        paths, captions = list(self.images), list(self.texts)
        table = self.matches.table([paths[i] for i in images.tolist()], [captions[j] for j in texts.tolist()])
        return table[per_image][:, per_text]


class DistillBatches(torch.utils.data.IterableDataset):
    """Epoch `epoch`'s distillation batches (the keys in the module docstring) for this rank: `batches` of them,
    the first `skip` passed over (resume), from the shuffled stream or, given `order`, a packing (RowSource)."""

    def __init__(self, spec: BatchSpec, files: Sequence[Path], corpus: Any, processors: Processors, epoch: int,
                 batches: int, skip: int = 0, order: Optional[Any] = None):
        self.spec, self.corpus, self.processors, self.epoch = spec, corpus, processors, epoch
        self.rows = RowSource(spec, files, epoch, batches, skip, order, COLUMNS)
        self.matches = Matches(corpus)
        self.images = ImageCache(corpus.image_paths, processors.image_processor, spec.image_cache_mb)

    def __iter__(self):
        return self.rows.built(self.build)

    def build(self, rows: dict[str, list]) -> dict[str, Any]:
        n_neg, m, items = self.spec.num_negatives, self.matches, BatchItems(self.matches)
        B = len(rows["query_id"])
        choice = [pick(self.spec.seed, self.epoch, rows["query_id"][r], len(rows["positive_ids"][r])) for r in range(B)]
        # the batch's pairs (query, positive) by image file and caption text: a list entry among them is in-batch
        pair_paths, pair_texts = set(), set()
        for r in range(B):
            i2t, qid, pos = rows["direction"][r] == "i2t", rows["query_id"][r], rows["positive_ids"][r][choice[r]]
            pair_paths.add(m.path(qid if i2t else pos))
            pair_texts.add(m.text(pos if i2t else qid))
        entries, false_negatives, dropped = self._lists(rows, choice, pair_paths, pair_texts)
        listed, inside = sum(map(len, entries)), sum(e[3] for kept in entries for e in kept)
        encoded = self._outside_encoded(entries, rows)

        is_i2t, query, positive, t_pos, pair_img, pair_txt = [], [], [], [], [], []
        cand = torch.zeros(B, n_neg, dtype=torch.long)
        cmask = torch.zeros(B, n_neg, dtype=torch.bool)
        teacher = torch.zeros(B, n_neg)
        for r in range(B):
            qid, pos, p = rows["query_id"][r], rows["positive_ids"][r][choice[r]], choice[r]
            scores = rows["teacher_scores"][r][:n_neg]
            i2t = rows["direction"][r] == "i2t"
            negs = [(j, neg) for j, neg, item, here in entries[r] if here or (i2t, item) in encoded]
            if i2t:
                q, pp = items.image(qid), items.text(pos)
                idx = [items.text(t) for _, t in negs]
                pair_img.append(q), pair_txt.append(pp)
            else:
                q, pp = items.text(qid), items.image(pos)
                idx = [items.image(i) for _, i in negs]
                pair_img.append(pp), pair_txt.append(q)
            is_i2t.append(i2t), query.append(q), positive.append(pp)
            t_pos.append(rows["positive_teacher_scores"][r][p])
            cand[r, : len(idx)] = torch.tensor(idx, dtype=torch.long)
            cmask[r, : len(idx)] = True
            teacher[r, : len(idx)] = torch.tensor([scores[j] for j, _ in negs], dtype=torch.float32)

        pixels = self.images.pixels(items.image_rows())
        tokens = items.tokens(self.processors)
        pi, pt = torch.tensor(pair_img), torch.tensor(pair_txt)
        return {
            "pixel_values": pixels,
            "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "pair_image": pi, "pair_text": pt, "pair_positive_mask": items.positives(pi, pt),
            "query_is_image": torch.tensor(is_i2t), "query": torch.tensor(query), "positive": torch.tensor(positive),
            "candidates": cand, "candidate_mask": cmask, "teacher": teacher,
            "teacher_positive": torch.tensor(t_pos, dtype=torch.float32),
            "false_negatives": torch.tensor(false_negatives), "dropped_by_margin": torch.tensor(dropped),
            "negatives": torch.tensor(listed), "negatives_in_batch": torch.tensor(inside),
        }

    def _lists(self, rows: dict[str, list], choice: list[int], pair_paths: set[str],
               pair_texts: set[str]) -> tuple[list[list[tuple]], int, int]:
        """Each row's list entries that may be negatives, as (position in the list, candidate id, its image file
        or caption text, in-batch), with the counts of false negatives and of candidates over the margin."""
        m, margin = self.matches, self.spec.max_teacher_margin
        entries, false_negatives, dropped = [], 0, 0
        for r in range(len(rows["query_id"])):
            qid, pos = rows["query_id"][r], rows["positive_ids"][r][choice[r]]
            tp = rows["positive_teacher_scores"][r][choice[r]]
            i2t = rows["direction"][r] == "i2t"
            kept = []
            for j, neg in enumerate(rows["candidate_ids"][r][:self.spec.num_negatives]):
                if m.false_negative(i2t, qid, pos, neg):
                    false_negatives += 1
                elif margin is not None and rows["teacher_scores"][r][j] > tp + margin:
                    dropped += 1
                else:
                    item = m.text(neg) if i2t else m.path(neg)
                    kept.append((j, neg, item, item in (pair_texts if i2t else pair_paths)))
            entries.append(kept)
        return entries, false_negatives, dropped

    def _outside_encoded(self, entries: list[list[tuple]], rows: dict[str, list]) -> set[tuple[bool, str]]:
        """The list entries outside the batch's pairs that are encoded, as (i2t, image file or caption text): none
        (outside "drop"), all ("encode"), or the `outside_budget` with the most weight (ties: first listed). Under
        priority "listed" each listing weighs 1; under "teacher-rank" a listing weighs 1 / sqrt(1 + r), r its rank
        by teacher score among its row's entries (0 = the hardest), so a row's hardest negatives go before the
        tail entries that many rows share; under "teacher-rank-steep" it weighs 1 / (1 + r)."""
        if self.spec.outside == "drop":
            return set()
        weights: dict[tuple[bool, str], float] = {}   # insertion order = first listed, for ties
        for r, kept in enumerate(entries):
            i2t = rows["direction"][r] == "i2t"
            if self.spec.outside_priority in RANK_WEIGHT:
                of_rank = RANK_WEIGHT[self.spec.outside_priority]
                scores = rows["teacher_scores"][r]
                order = sorted(range(len(kept)), key=lambda e: -scores[kept[e][0]])   # stable: ties keep list order
                weight = [0.0] * len(kept)
                for rank, e in enumerate(order):
                    weight[e] = of_rank(rank)
            elif self.spec.outside_priority == "listed":
                weight = [1.0] * len(kept)
            else:
                raise ValueError(f"unknown outside_priority {self.spec.outside_priority!r} (known: {PRIORITIES})")
            for (_, _, item, here), w in zip(kept, weight):
                if not here:
                    weights[(i2t, item)] = weights.get((i2t, item), 0.0) + w
        ranked = sorted(weights, key=lambda key: -weights[key])   # a stable sort: ties stay first listed first
        return set(ranked[:self.spec.outside_budget])


class MatchingBatches(torch.utils.data.IterableDataset):
    """Batches for training the cross-encoder's matching head from the student's mined candidates (RUN/mine).

    Each row (query) gives a positive pair, a hard negative drawn from its first N candidates with probability
    softmax(student cosine / `temperature`) (as ALBEF and BLIP sample ITM negatives by similarity; false
    negatives never drawn), and, with `in_batch`, a negative taken from another row of the batch (that row's
    positive caption for an image query, its positive image for a caption query) unless it matches the query.
    Draws are hashes of (seed, epoch, query), so a resumed epoch draws the same. Rows are dealt as distill's
    (RowSource, from the shuffled stream).

    | key                   | shape          | meaning                                                   |
    | --------------------- | -------------- | --------------------------------------------------------- |
    | pixel_values          | [Ui, 3, H, W]  | the batch's unique images (zero-padded to the largest)    |
    | pixel_mask            | [Ui, H, W]     | 1 on real pixels                                          |
    | input_ids, attention_mask | [Ut, L]    | the batch's unique captions                               |
    | pair_image, pair_text | [P]            | each pair's image and caption                             |
    | label                 | [P]            | 1.0 for a positive pair, 0.0 for a negative               |
    | positive_pairs        | [B]            | index into the pairs of each row's positive pair          |
    | positive_mask         | [B, B]         | True where row i's positive image matches row j's caption |
    | false_negatives       | []             | candidates passed over because they match the query       |
    """

    columns = ("direction", "query_id", "positive_ids", "candidate_ids", "student_scores")

    def __init__(self, spec: BatchSpec, files: Sequence[Path], corpus: Any, processors: Processors, epoch: int,
                 batches: int, skip: int = 0, temperature: float = 0.05, in_batch: bool = True):
        self.spec, self.corpus, self.processors, self.epoch = spec, corpus, processors, epoch
        self.rows = RowSource(spec, files, epoch, batches, skip, columns=self.columns)
        self.matches = Matches(corpus)
        self.images = ImageCache(corpus.image_paths, processors.image_processor, spec.image_cache_mb)
        self.temperature, self.in_batch = temperature, in_batch

    def __iter__(self):
        return self.rows.built(self.build)

    def _draw(self, query_id: str, what: str, weights: Sequence[float]) -> int:
        """A draw from `weights` (unnormalised) fixed by (seed, epoch, query)."""
        u = zlib.crc32(f"{self.spec.seed}:{self.epoch}:{query_id}:{what}".encode()) / 2**32
        total, acc = sum(weights), 0.0
        for i, w in enumerate(weights):
            acc += w / total
            if u < acc:
                return i
        return len(weights) - 1

    def build(self, rows: dict[str, list]) -> dict[str, Any]:
        import math

        n_neg, items = self.spec.num_negatives, BatchItems(self.matches)
        img, txt = items.image, items.text
        B = len(rows["query_id"])
        pair_img, pair_txt, label, positive_pairs, false_negatives = [], [], [], [], 0
        chosen = []   # (is_i2t, query id, positive id) per row
        for r in range(B):
            qid, pos_ids = rows["query_id"][r], rows["positive_ids"][r]
            pos = pos_ids[pick(self.spec.seed, self.epoch, qid, len(pos_ids))]
            i2t = rows["direction"][r] == "i2t"
            chosen.append((i2t, qid, pos))
            negs, sims = [], []
            for cand, sim in zip(rows["candidate_ids"][r][:n_neg], rows["student_scores"][r][:n_neg]):
                if self.matches.false_negative(i2t, qid, pos, cand):
                    false_negatives += 1
                else:
                    negs.append(cand), sims.append(sim)
            positive_pairs.append(len(label))
            if i2t:
                pair_img.append(img(qid)), pair_txt.append(txt(pos)), label.append(1.0)
            else:
                pair_img.append(img(pos)), pair_txt.append(txt(qid)), label.append(1.0)
            if negs:
                top = max(sims)   # softmax weights, shifted for stability
                neg = negs[self._draw(qid, "hard", [math.exp((s - top) / self.temperature) for s in sims])]
                if i2t:
                    pair_img.append(img(qid)), pair_txt.append(txt(neg))
                else:
                    pair_img.append(img(neg)), pair_txt.append(txt(qid))
                label.append(0.0)
        if self.in_batch and B > 1:
            for r, (i2t, qid, pos) in enumerate(chosen):
                other_i2t, other_q, other_pos = chosen[(r + 1 + self._draw(qid, "batch", [1.0] * (B - 1))) % B]
                # the other row's caption (for an image query) or image (for a caption query)
                cand = (other_pos if other_i2t else other_q) if i2t else (other_q if other_i2t else other_pos)
                if not self.matches.false_negative(i2t, qid, pos, cand):
                    pair_img.append(img(qid) if i2t else img(cand)), pair_txt.append(txt(cand) if i2t else txt(qid))
                    label.append(0.0)
        # images of any size (ViLT keeps aspect ratios), each processed alone (a batched call would pad them
        # without telling which pixels are real), then zero-padded to the largest with the pixel mask
        pixels, mask = pad_images([self.images.processed([row])[0] for row in items.image_rows()])
        tokens = items.tokens(self.processors)
        pi, pt = torch.tensor(pair_img), torch.tensor(pair_txt)
        pos_i, pos_t = pi[positive_pairs], pt[positive_pairs]
        return {"pixel_values": pixels, "pixel_mask": mask, "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"], "pair_image": pi, "pair_text": pt,
                "label": torch.tensor(label), "positive_pairs": torch.tensor(positive_pairs),
                "positive_mask": items.positives(pos_i, pos_t),
                "false_negatives": torch.tensor(false_negatives)}


def loader(dataset: torch.utils.data.IterableDataset, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)
