"""Memory one training process holds for its data: the preprocessed cases of a plan loaded in memory (as
before issue 33) or memory-mapped (now), and after drawing 50 batches of patches (Linux: /proc/self/status).

    recokd plan ../shared/data/BraTS2015-subset --cache /tmp/brats_cache
    python scripts/measure_rank_memory.py /tmp/brats_cache memory     # then: ... mmap

Private (anonymous) memory is what each process (each loader worker, each torchrun rank) pays for itself;
shared file pages are the page cache, one copy for every process on the machine, and reclaimable.
"""
import os, sys, json, resource
import numpy as np
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["RssAnon"].split()[0]) / 1024, int(fields["RssFile"].split()[0]) / 1024
from ReCoKDLib.data.planning import Plans
from ReCoKDLib.data.preprocessing import load_preprocessed, cache_folder
from ReCoKDLib.data.loader import PatchBatches
cache = sys.argv[1]; mmap = sys.argv[2] == "mmap"
plans = Plans.load(os.path.join(cache, "plans.json"))
folder = cache_folder(cache, plans)
ids = sorted({p.name.split("_image")[0] for p in folder.glob("*_image.npy")})
base = rss()
cases = [load_preprocessed(cache, plans, i, mmap=mmap) for i in ids]
loaded = rss()
size = sum(c.image.nbytes + c.label.nbytes for c in cases) / 2**20
data = PatchBatches([c.image for c in cases], [c.label for c in cases], plans.patch_size, batch_size=2, seed=0, length=50)
for i in range(50): data[i]
drawn = rss()
print(json.dumps({"mode": "mmap" if mmap else "in memory", "cases": len(ids), "dataset_MiB": round(size),
                  "private_after_load_MiB": round(loaded[0] - base[0]), "private_after_50_batches_MiB": round(drawn[0] - base[0]),
                  "shared_file_pages_after_50_batches_MiB": round(drawn[1] - base[1])}))
