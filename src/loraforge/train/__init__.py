"""Training.

task.py        `Task`: the contract between a kind of training and the loop (defaults included)
loop.py        `train(task, config) -> TrainResult`: set-up, resume, the step, eval / samples /
               checkpoints, finish
config.py      the config dataclasses (`TrainConfig`; `lora` is a `LoraConfig`), YAML, flags, examples
checkpoint.py  resumable checkpoints
metrics.py     metrics.csv and TensorBoard
signals.py     Ctrl-C / SIGTERM: finish the step, checkpoint, stop
charts.py      loss.png
text.py        `loraforge train` and `train_text(config) -> TrainResult`
image.py       `loraforge train-image` and `train_image(config) -> TrainResult`
"""
