"""Training batches streamed from teacher shards.

The shards are read with `datasets` (Parquet, `streaming=True`) through a seeded shuffle buffer, so host
memory is bounded by the buffer, not the data. Row batches of that one global stream are dealt round-robin:
batch b goes to rank b % W and, on that rank, to DataLoader worker (b // W) % workers. Every rank therefore
gets the same number of batches (DDP needs that; splitting by shard does not guarantee it), the order does
not depend on the number of workers, and a resume skips consumed batches without decoding their images.

A batch encodes each unique image and caption once. For B queries with N hard negatives each:

| key                   | shape          | meaning                                                    |
| --------------------- | -------------- | ---------------------------------------------------------- |
| pixel_values          | [Ui, 3, H, W]  | the batch's unique images                                  |
| input_ids, attention_mask | [Ut, L]    | the batch's unique captions                                |
| pair_image, pair_text | [B]            | (query, positive) pairs for the contrastive loss           |
| pair_positive_mask    | [B, B]         | True where pair i's image matches pair j's caption         |
| query_is_image        | [B]            | True for i2t rows (query image, candidate texts)           |
| query, positive       | [B]            | index into images (i2t query) or texts (t2i query), etc.   |
| candidates            | [B, N]         | index of each hard negative in the other modality          |
| candidate_mask        | [B, N]         | True = real candidate                                      |
| teacher, teacher_positive | [B, N], [B] | teacher log-odds of negatives and of the chosen positive  |
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import PipelineError
from .models import load_image

COLUMNS = ["direction", "query_id", "positive_ids", "candidate_ids", "teacher_scores", "positive_teacher_scores"]


def teacher_stream(files: Sequence[Path], seed: int, epoch: int, shuffle_buffer: int):
    import datasets

    # `datasets` sleeps this long at the end of every pass over Parquet (letting Arrow reader threads wind
    # down before a possible interpreter exit). Training goes on after each pass, so a short grace suffices;
    # the default 5 s would cost more than a whole epoch on small data.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = min(datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN, 0.5)
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
    ds = ds.select_columns(COLUMNS)
    if shuffle_buffer > 1:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
        ds.set_epoch(epoch)
    return ds


def pick(seed: int, epoch: int, query_id: str, n: int) -> int:
    """Which positive a row uses this epoch: a hash, so the choice survives a resume exactly."""
    return zlib.crc32(f"{seed}:{epoch}:{query_id}".encode()) % n


class DistillBatches(torch.utils.data.IterableDataset):
    def __init__(self, files: Sequence[Path], corpus: Any, image_processor: Any, tokenizer: Any, max_length: int,
                 batch_size: int, num_negatives: int, batches: int, seed: int, epoch: int, shuffle_buffer: int,
                 rank: int = 0, world_size: int = 1, skip: int = 0, image_cache_mb: float = 512):
        self.files, self.corpus = list(files), corpus
        self.image_processor, self.tokenizer, self.max_length = image_processor, tokenizer, max_length
        self.batch_size, self.num_negatives, self.batches = batch_size, num_negatives, batches
        self.seed, self.epoch, self.shuffle_buffer = seed, epoch, shuffle_buffer
        self.rank, self.world_size, self.skip = rank, world_size, skip
        # Hard-negative images recur many times per epoch: keep processed images, least recently used out,
        # up to `image_cache_mb` per worker (bounded, so host memory does not grow with the data).
        self.cache_bytes, self._cache, self._cached = int(image_cache_mb * 2**20), OrderedDict(), 0
        self.image_row = {iid: i for i, iid in enumerate(corpus.image_ids)}
        self.text_row = {tid: i for i, tid in enumerate(corpus.text_ids)}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream = teacher_stream(self.files, self.seed, self.epoch, self.shuffle_buffer)
        local = 0  # index among this rank's batches
        # The stream is read to its end even past `self.batches`: batches are skipped, never cut, so the
        # reader shuts down the same way every time.
        for b, rows in enumerate(stream.iter(batch_size=self.batch_size)):
            if b % self.world_size != self.rank or local >= self.batches:
                continue
            if local >= self.skip and (local - self.skip) % workers == worker:
                try:
                    yield self.build(rows)
                except PipelineError as e:  # re-raised by the training loop with its one-line message
                    yield {"error": str(e)}
            local += 1

    def build(self, rows: dict[str, list]) -> dict[str, Any]:
        c, n_neg = self.corpus, self.num_negatives
        images: dict[int, int] = {}   # corpus image row -> batch index
        texts: dict[str, int] = {}    # caption text -> batch index (identical captions are one text)

        def img(iid: str) -> int:
            return images.setdefault(self.image_row[iid], len(images))

        def txt(tid: str) -> int:
            return texts.setdefault(c.texts[self.text_row[tid]], len(texts))

        B = len(rows["query_id"])
        is_i2t, query, positive, t_pos = [], [], [], []
        pair_img, pair_txt = [], []
        cand = torch.zeros(B, n_neg, dtype=torch.long)
        cmask = torch.zeros(B, n_neg, dtype=torch.bool)
        teacher = torch.zeros(B, n_neg)
        for r in range(B):
            qid, pos_ids = rows["query_id"][r], rows["positive_ids"][r]
            p = pick(self.seed, self.epoch, qid, len(pos_ids))
            negs = rows["candidate_ids"][r][:n_neg]
            scores = rows["teacher_scores"][r][:n_neg]
            i2t = rows["direction"][r] == "i2t"
            if i2t:
                q, pp = img(qid), txt(pos_ids[p])
                idx = [txt(t) for t in negs]
                pair_img.append(q), pair_txt.append(pp)
            else:
                q, pp = txt(qid), img(pos_ids[p])
                idx = [img(i) for i in negs]
                pair_img.append(pp), pair_txt.append(q)
            is_i2t.append(i2t), query.append(q), positive.append(pp)
            t_pos.append(rows["positive_teacher_scores"][r][p])
            cand[r, : len(idx)] = torch.tensor(idx, dtype=torch.long)
            cmask[r, : len(idx)] = True
            teacher[r, : len(idx)] = torch.tensor(scores, dtype=torch.float32)

        pixels = self.pixels(list(images))
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
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
        }


    def pixels(self, rows: list[int]) -> torch.Tensor:
        """[len(rows), 3, H, W]: cached images reused, the rest decoded and processed in one call."""
        missing = [r for r in rows if r not in self._cache]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            pixels = self.image_processor(images=[load_image(self.corpus.image_paths[r]) for r in missing],
                                          return_tensors="pt")["pixel_values"]
            fresh = dict(zip(missing, pixels.clone().unbind(0)))  # own storage: a cached view would pin the batch
        out = torch.stack([self._cache[r] if r in self._cache else fresh[r] for r in rows])
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


def loader(dataset: DistillBatches, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)
