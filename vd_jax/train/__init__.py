"""Training: the loop, the jitted step and its objective, optimizer, checkpoints, sharding.

- `loop`: `train_and_evaluate` (resume, preemption, logging, sample grids).
- `step`: the train state, the one jitted step, the optimizer.
- `objective`: VD's mixed-flow loss.
- `sharding`: mesh, param and batch shardings.
- `init_from`: starting a run from pretrained weights or another run.
- `metrics`: metrics.jsonl, TensorBoard events, the loss curve.
- `samples`: sample grids during training.
- `flop_count`: FLOPs of a traced step (MFU).
"""
