"""The training room: the optimizer, the pure sharded step, feeding, held-out evaluation, the run's log and the
resumable loop (`loop.train_model`). Settings come from config.TrainSettings; nothing here reads the ConfigDict.

    optim.py    learning-rate schedule, weight-decay mask, frozen parameters, the optax chain
    step.py     SplitModel, the pure train / eval steps, state shardings, the jitted step functions
    feed.py     host rows -> global arrays, this process's share of a batch, the data iterator's position
    heldout.py  the one held-out evaluator (per-task loss and token accuracy), used by train and evaluate
    runlog.py   metrics.jsonl + TensorBoard, the SIGTERM watch, Preempted
    loop.py     train_model: Orbax checkpoints + Grain data, resumable, the final checkpoint
    tiny.py     the random tiny model a run starts from when there is no pretrained one
"""
