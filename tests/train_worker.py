"""One process of the two-process training test (tests/test_train_multihost.py).

python tests/train_worker.py PORT PROCESS_ID WORKDIR STEPS TINY_ARG
"""

import os
import sys

# 4 CPU devices per process, 8 in all: set before jax starts its backend.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    port, pid, workdir, steps, tiny_arg = sys.argv[1:6]
    from configs import tiny
    from vd_jax.train.loop import train_and_evaluate

    c = tiny.get_config(tiny_arg)
    c.num_steps, c.mesh_shape = int(steps), "4,2"
    c.checkpoint_every, c.peak_flops, c.sample_every = 1000, 1.0, -1
    c.distributed.update(
        enabled=True,
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=int(pid),
    )
    c.compilation_cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    train_and_evaluate(c, workdir)


if __name__ == "__main__":
    main()
