"""HF transformers side of benchmarks/train_step.py: a long-lived worker in the tool venv (torch + transformers,
see tools/README.md), so it takes turns with the JAX side, one call each per round, under the same machine noise.

    /tmp/hfvenv/bin/python benchmarks/hf_train_worker.py CONFIG_DIR [THREADS]

CONFIG_DIR holds a config.json (nemotron_jax.convert.config_to_hf of the benchmark's model); the model is built from
it with random weights in fp32 (weights are not shared with the JAX side, only the architecture). Its Mamba path is
whatever transformers picks without the CUDA kernels (the pure-torch chunked scan on CPU).

Protocol: the first line out is {"ready": true, "torch": ..., "transformers": ..., "params": N, "threads": T}.
Then one JSON request per line in, one JSON answer per line out:
  {"op": "fwd", "ids": [[...], ...]}     forward + loss (labels = ids), no autograd graph
  {"op": "fwdbwd", "ids": [[...], ...]}  forward + loss + backward (grads of every parameter)
answer: {"s": seconds of the call, "loss": float, "max_rss_mb": max RSS of this process so far}
or {"error": "..."} (the worker keeps serving).
"""

import json
import resource
import sys
import time
import traceback


def main() -> None:
    import torch
    import transformers
    from transformers import AutoConfig, NemotronHForCausalLM

    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(sys.argv[1])
    model = NemotronHForCausalLM(config).to(torch.float32)
    model.train()  # no dropout in NemotronH; train mode is what a training step runs
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"ready": True, "torch": torch.__version__, "transformers": transformers.__version__,
                      "params": n_params, "threads": torch.get_num_threads()}), flush=True)

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            ids = torch.tensor(req["ids"], dtype=torch.long)
            if req["op"] == "fwd":
                with torch.no_grad():
                    t0 = time.perf_counter()
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    dt = time.perf_counter() - t0
            elif req["op"] == "fwdbwd":
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                dt = time.perf_counter() - t0
                model.zero_grad(set_to_none=True)
            else:
                raise ValueError(f"unknown op {req['op']!r}")
            print(json.dumps({"s": dt, "loss": float(loss.detach()), "max_rss_mb": rss_mb()}), flush=True)
        except Exception as e:  # noqa: BLE001  (report, keep serving)
            print(json.dumps({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=5)}),
                  flush=True)


if __name__ == "__main__":
    main()
