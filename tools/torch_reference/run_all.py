"""Every check of docs/torch_reference.md in one process (one torch import, which matters on a
leased GPU): float32 on the GPU and the CPU, bfloat16 on the GPU, and one perturbed weight that
must fail. Run it in the folder that holds demo/variant/nvfp4 .safetensors and .json:

    cd DIR && python3 /path/to/tools/torch_reference/run_all.py
"""
import torch

import check_logits

print("torch", torch.__version__, "cuda",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, flush=True)
runs = [(d, "float32", c, None) for d in ("cuda", "cpu") for c in ("demo", "variant", "nvfp4")]
runs += [("cuda", "bfloat16", c, None) for c in ("demo", "variant", "nvfp4")]
runs += [("cuda", "float32", "demo", "layers.3.experts.w_down")]  # must exit 1
for device, dtype, ckpt, perturb in runs:
    argv = ["--checkpoint", ckpt + ".safetensors", "--ours", ckpt + ".json",
            "--device", device, "--dtype", dtype]
    if perturb:
        argv += ["--perturb", perturb]
    print("exit", check_logits.main(argv), flush=True)
