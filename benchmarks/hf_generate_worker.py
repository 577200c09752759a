"""HF transformers side of benchmarks/generate.py: a long-lived worker in the tool venv (torch + transformers,
see tools/README.md), so it takes turns with the JAX side under the same machine noise.

    /tmp/hfvenv/bin/python benchmarks/hf_generate_worker.py CHECKPOINT_DIR

Reads one JSON request per line on stdin: {"ids": [[...], ...], "new": N}; answers one JSON line:
{"prefill_s": ..., "decode_s": ..., "tokens": [[...]]} for greedy `generate` with its cache (use_cache=True),
exactly N new tokens (no eos stop). A streamer stamps each token as generate() emits it: prefill_s runs from the
call to the first new token, decode_s from the first to the last (N - 1 cached decode steps).
"""

import json
import sys
import time

import torch
from transformers import NemotronHForCausalLM
from transformers.generation.streamers import BaseStreamer


class Stamps(BaseStreamer):
    def __init__(self):
        self.times = []

    def put(self, value):  # first call: the prompt; then one call per generated step
        self.times.append(time.perf_counter())

    def end(self):
        pass


def main() -> None:
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    model = NemotronHForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        ids = torch.tensor(req["ids"], dtype=torch.long)
        kw = dict(do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
        stamps = Stamps()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=req["new"], min_new_tokens=req["new"], streamer=stamps, **kw)
        new = stamps.times[1:]
        print(json.dumps({"prefill_s": new[0] - t0, "decode_s": new[-1] - new[0],
                          "tokens": out[:, ids.shape[1]:].tolist()}), flush=True)


if __name__ == "__main__":
    main()
