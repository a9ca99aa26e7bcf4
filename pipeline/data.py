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
| pair_positive_mask    | [B, B]         | True where pair i's image matches pair j's caption         |
| query_is_image        | [B]            | True for i2t rows (query image, candidate texts)           |
| query, positive       | [B]            | index into images (i2t query) or texts (t2i query), etc.   |
| candidates            | [B, N]         | index of each hard negative in the other modality          |
| candidate_mask        | [B, N]         | True = a real negative (not padding, not a false negative) |
| teacher, teacher_positive | [B, N], [B] | teacher scores of negatives and of the chosen positive    |
| false_negatives       | []             | candidates dropped as identical to a positive              |
| dropped_by_margin     | []             | candidates dropped because the teacher scores them above the positive by more than `max_teacher_margin` |

False negatives: a mined candidate that is really a match is never a negative. An i2t candidate caption is
one when its text is identical to one of the query image's own captions, or when it belongs to the same image
file; a t2i candidate image is one when it is the query's image file, or when the query caption is
identical to one of its captions. With `max_teacher_margin`, a candidate the teacher scores above the
positive by more than that margin is dropped too.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .errors import PipelineError
from .models import load_image, pad_images

COLUMNS = ["direction", "query_id", "positive_ids", "candidate_ids", "teacher_scores", "positive_teacher_scores"]


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


def pick(seed: int, epoch: int, query_id: str, n: int) -> int:
    """Which positive a row uses this epoch: a hash, so the choice survives a resume exactly."""
    return zlib.crc32(f"{seed}:{epoch}:{query_id}".encode()) % n


@dataclass(frozen=True)
class BatchSpec:
    """What a training batch is made of, and this process's share of the stream."""
    batch_size: int                        # queries per micro-batch
    num_negatives: int                     # the first N mined candidates of each row
    seed: int                              # shuffle and positive choice
    shuffle_buffer: int = 10000            # rows in the streaming shuffle buffer
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


class DistillBatches(torch.utils.data.IterableDataset):
    """Epoch `epoch`'s batches for this rank: `batches` of them, the first `skip` passed over (resume)."""

    columns: Sequence[str] = COLUMNS

    def __init__(self, spec: BatchSpec, files: Sequence[Path], corpus: Any, processors: Processors, epoch: int,
                 batches: int, skip: int = 0):
        self.spec, self.files, self.corpus, self.processors = spec, list(files), corpus, processors
        self.epoch, self.batches, self.skip = epoch, batches, skip
        # Hard-negative images recur many times per epoch: keep processed images, least recently used out,
        # up to `image_cache_mb` per worker (bounded, so host memory does not grow with the data).
        self.cache_bytes, self._cache, self._cached = int(spec.image_cache_mb * 2**20), OrderedDict(), 0
        self.image_row = {iid: i for i, iid in enumerate(corpus.image_ids)}
        self.text_row = {tid: i for i, tid in enumerate(corpus.text_ids)}
        # for false negatives: each image's caption texts, each text's image row
        self.text_image = corpus.text_image_rows()
        self.row_of_path: dict[str, int] = {}
        for i, path in enumerate(corpus.image_paths):
            self.row_of_path.setdefault(path, i)
        self.image_captions: list[set[str]] = [set() for _ in corpus.image_ids]
        for text, img in zip(corpus.texts, self.text_image):
            self.image_captions[img].add(text)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        spec = self.spec
        stream = teacher_stream(self.files, spec.seed, self.epoch, spec.shuffle_buffer, self.columns)
        local = 0  # index among this rank's batches
        # The stream is read to its end even past `self.batches`: batches are skipped, never cut, so the
        # reader shuts down the same way every time.
        for b, rows in enumerate(stream.iter(batch_size=spec.batch_size)):
            if b % spec.world_size != spec.rank or local >= self.batches:
                continue
            if local >= self.skip and (local - self.skip) % workers == worker:
                try:
                    yield self.build(rows)
                except PipelineError as e:  # re-raised by the training loop with its one-line message
                    yield {"error": str(e)}
            local += 1

    def _false_negative(self, i2t: bool, query: str, positive: str, candidate: str) -> bool:
        c = self.corpus
        if i2t:
            img = self.image_row[query]
            t = self.text_row[candidate]
            return (c.texts[t] in self.image_captions[img]
                    or c.image_paths[self.text_image[t]] == c.image_paths[img])
        img = self.image_row[candidate]
        return (c.image_paths[img] == c.image_paths[self.image_row[positive]]
                or c.texts[self.text_row[query]] in self.image_captions[img])

    def build(self, rows: dict[str, list]) -> dict[str, Any]:
        c, n_neg, margin = self.corpus, self.spec.num_negatives, self.spec.max_teacher_margin
        images: dict[str, int] = {}   # image file -> batch index (two ids of one file are one image)
        texts: dict[str, int] = {}    # caption text -> batch index (identical captions are one text)

        def img(iid: str) -> int:
            return images.setdefault(c.image_paths[self.image_row[iid]], len(images))

        def txt(tid: str) -> int:
            return texts.setdefault(c.texts[self.text_row[tid]], len(texts))

        B = len(rows["query_id"])
        is_i2t, query, positive, t_pos = [], [], [], []
        pair_img, pair_txt = [], []
        cand = torch.zeros(B, n_neg, dtype=torch.long)
        cmask = torch.zeros(B, n_neg, dtype=torch.bool)
        teacher = torch.zeros(B, n_neg)
        false_negatives = dropped = 0
        for r in range(B):
            qid, pos_ids = rows["query_id"][r], rows["positive_ids"][r]
            p = pick(self.spec.seed, self.epoch, qid, len(pos_ids))
            scores = rows["teacher_scores"][r][:n_neg]
            tp = rows["positive_teacher_scores"][r][p]
            i2t = rows["direction"][r] == "i2t"
            negs = []
            for j, neg in enumerate(rows["candidate_ids"][r][:n_neg]):
                if self._false_negative(i2t, qid, pos_ids[p], neg):
                    false_negatives += 1
                elif margin is not None and scores[j] > tp + margin:
                    dropped += 1
                else:
                    negs.append((j, neg))
            if i2t:
                q, pp = img(qid), txt(pos_ids[p])
                idx = [txt(t) for _, t in negs]
                pair_img.append(q), pair_txt.append(pp)
            else:
                q, pp = txt(qid), img(pos_ids[p])
                idx = [img(i) for _, i in negs]
                pair_img.append(pp), pair_txt.append(q)
            is_i2t.append(i2t), query.append(q), positive.append(pp)
            t_pos.append(tp)
            cand[r, : len(idx)] = torch.tensor(idx, dtype=torch.long)
            cmask[r, : len(idx)] = True
            teacher[r, : len(idx)] = torch.tensor([scores[j] for j, _ in negs], dtype=torch.float32)

        pixels = self.pixels([self.row_of_path[path] for path in images])
        proc = self.processors
        tokens = proc.tokenizer(list(texts), padding=True, truncation=True, max_length=proc.max_length,
                                return_tensors="pt")
        pi, pt = torch.tensor(pair_img), torch.tensor(pair_txt)
        return {
            "pixel_values": pixels,
            "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "pair_image": pi, "pair_text": pt,
            "pair_positive_mask": (pi[:, None] == pi[None, :]) | (pt[:, None] == pt[None, :]),
            "query_is_image": torch.tensor(is_i2t), "query": torch.tensor(query), "positive": torch.tensor(positive),
            "candidates": cand, "candidate_mask": cmask, "teacher": teacher,
            "teacher_positive": torch.tensor(t_pos, dtype=torch.float32),
            "false_negatives": torch.tensor(false_negatives), "dropped_by_margin": torch.tensor(dropped),
        }

    def pixels(self, rows: list[int]) -> torch.Tensor:
        """[len(rows), 3, H, W]: cached images reused, the rest decoded and processed in one call."""
        return torch.stack(self.processed(rows))

    def processed(self, rows: list[int]) -> list[torch.Tensor]:
        """Each row's processed image [3, H, W]: cached ones reused, the rest decoded and processed in one call."""
        missing = [r for r in rows if r not in self._cache]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            pixels = self.processors.image_processor(images=[load_image(self.corpus.image_paths[r]) for r in missing],
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


class MatchingBatches(DistillBatches):
    """Batches for training the cross-encoder's matching head from the student's mined candidates (RUN/mine).

    Each row (query) gives a positive pair, a hard negative drawn from its first N candidates with probability
    softmax(student cosine / `temperature`) (as ALBEF and BLIP sample ITM negatives by similarity; false
    negatives never drawn), and, with `in_batch`, a negative taken from another row of the batch (that row's
    positive caption for an image query, its positive image for a caption query) unless it matches the query.
    Draws are hashes of (seed, epoch, query), so a resumed epoch draws the same.

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
        super().__init__(spec, files, corpus, processors, epoch, batches, skip)
        self.temperature, self.in_batch = temperature, in_batch

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

        c, n_neg = self.corpus, self.spec.num_negatives
        images: dict[str, int] = {}
        texts: dict[str, int] = {}

        def img(iid: str) -> int:
            return images.setdefault(c.image_paths[self.image_row[iid]], len(images))

        def txt(tid: str) -> int:
            return texts.setdefault(c.texts[self.text_row[tid]], len(texts))

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
                if self._false_negative(i2t, qid, pos, cand):
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
                if not self._false_negative(i2t, qid, pos, cand):
                    pair_img.append(img(qid) if i2t else img(cand)), pair_txt.append(txt(cand) if i2t else txt(qid))
                    label.append(0.0)
        # images of any size (ViLT keeps aspect ratios), each processed alone (a batched call would pad them
        # without telling which pixels are real), then zero-padded to the largest with the pixel mask
        pixels, mask = pad_images([self.processed([self.row_of_path[path]])[0] for path in images])
        proc = self.processors
        tokens = proc.tokenizer(list(texts), padding=True, truncation=True, max_length=proc.max_length,
                                return_tensors="pt")
        pi, pt = torch.tensor(pair_img), torch.tensor(pair_txt)
        pos_i, pos_t = pi[positive_pairs], pt[positive_pairs]
        return {"pixel_values": pixels, "pixel_mask": mask, "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"], "pair_image": pi, "pair_text": pt,
                "label": torch.tensor(label), "positive_pairs": torch.tensor(positive_pairs),
                "positive_mask": (pos_i[:, None] == pos_i[None, :]) | (pos_t[:, None] == pos_t[None, :]),
                "false_negatives": torch.tensor(false_negatives)}


def loader(dataset: DistillBatches, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)
