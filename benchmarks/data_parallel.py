"""Data-parallel training throughput: images/s of the same global batch on 1 vs N devices.

    python benchmarks/data_parallel.py --host-devices 4      # N forced CPU devices (must be set before JAX starts)
    python benchmarks/data_parallel.py                        # the real devices (e.g. several GPUs)

Runs ``fit`` for one epoch on generated data per device count and reports training images/s from the
epoch time after compilation. Forced CPU devices share the same cores, so they show the overhead of the
sharded program, not a speed-up; real GPUs show the scaling.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host-devices", type=int, default=None, help="force N CPU devices")
    p.add_argument("--model", default="convnet")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--images", type=int, default=8192)
    a = p.parse_args()
    if a.host_devices:
        if "jax" in sys.modules:
            raise SystemExit("--host-devices must be set before JAX starts")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} " \
                                  f"--xla_force_host_platform_device_count={a.host_devices}".strip()
    import jax

    import jaxcifar  # noqa: F401
    from jaxcifar.data.synthetic import synthetic_cifar
    from jaxcifar.train import TrainConfig, fit

    data = synthetic_cifar(a.images, 256)
    n_all = len(jax.devices())
    print(f"backend {jax.default_backend()}, {n_all} devices, model {a.model}, global batch {a.batch}")
    counts = sorted({1, *(n for n in (2, 4, 8) if n <= n_all), n_all})
    base = None
    for n in counts:
        if a.batch % n:
            continue
        cfg = TrainConfig(model=a.model, batch_size=a.batch, epochs=2, val_size=0, devices=n, log_every=10**6)
        r = fit(cfg, data, progress=False)
        seconds = r.history["epoch_seconds"][1]  # the second epoch: compiled already
        ips = (a.images // a.batch) * a.batch / seconds
        base = base or ips
        print(f"{n:2d} devices: {ips:8.0f} images/s ({ips / base:.2f}x of 1 device)", flush=True)


if __name__ == "__main__":
    main()
