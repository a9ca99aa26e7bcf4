"""`make bench`: every benchmark, each writing bench/results/NAME.json. `--quick` shrinks the corpora."""
import sys

from bench import (activation_bench, blip2_bench, corpus_hash_bench, distill_bench, epoch_bench, gpu_epoch_bench,
                   itc_bench, mine_bench, teacher_bench, teacher_kv_bench, webdataset_bench)
from bench.common import write

if __name__ == "__main__":
    quick = "--quick" in sys.argv
    write("mine", mine_bench.main(n_images=4000 if quick else 40000, batch=4096))
    write("corpus_hash" + ("_quick" if quick else ""), corpus_hash_bench.main(n_files=500 if quick else 5000))
    write("score_teacher", teacher_bench.main())
    write("score_teacher_kv" + ("_quick" if quick else ""), teacher_kv_bench.main(quick=quick))
    write("score_teacher_blip2", blip2_bench.main())
    write("distill", distill_bench.main())
    write("gpu_epoch", gpu_epoch_bench.main())   # recorded as skipped without CUDA
    write("activation", activation_bench.main())   # a step's activations at CLIP ViT-B/16's size, 6 minutes
    write("webdataset" + ("_quick" if quick else ""), webdataset_bench.main(n_images=600 if quick else 3000))
    if not quick:   # the transfer demo's data: mining and scoring it once takes minutes
        write("epoch", epoch_bench.main())
        write("score_teacher_itc", itc_bench.main())
