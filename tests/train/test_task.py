"""The `Task` contract: the base class's defaults, and a task with only the required methods trains."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loraforge.train.loop as loop
from loraforge import LoraConfig, LoraModel, get_lora_model
from loraforge.errors import UserError
from loraforge.train.config import TrainConfig
from loraforge.train.image import ImageTask
from loraforge.train.loop import TrainResult, train
from loraforge.train.task import Task
from loraforge.train.text import TextTask


class Regression(Task):
    """Only the six required methods: LoRA on one linear layer fitting a fixed linear map."""

    def __init__(self, batches: int = 5, batch_size: int = 4):
        generator = torch.Generator().manual_seed(0)
        target = torch.randn(3, 6, generator=generator)
        xs = [torch.randn(batch_size, 6, generator=generator) for _ in range(batches)]
        self.data = [(x, x @ target.T) for x in xs]

    def build(self, accelerator):
        self.lora = get_lora_model(nn.Sequential(nn.Linear(6, 3)), LoraConfig(r=2, target_modules=["0"]))
        self.model = self.lora

    def trainable_parameters(self):
        return [p for p in self.lora.parameters() if p.requires_grad]

    def num_batches(self):
        return len(self.data)

    def train_batches(self, epoch, start=0):
        return iter(self.data[start:])

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self.model(x), y), x.shape[0]

    def save_adapter(self, directory):
        self.lora.save_pretrained(directory)


def test_the_loop_probes_no_task_attributes():
    source = inspect.getsource(loop)
    assert "hasattr(" not in source and "getattr(task" not in source and "getattr(self.task" not in source


def test_the_command_tasks_are_tasks():
    assert issubclass(TextTask, Task) and issubclass(ImageTask, Task)
    assert TextTask.throughput_unit == "tok" and ImageTask.throughput_unit == "img"


def test_required_methods_are_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Task()

    class Partial(Task):
        def build(self, accelerator):
            pass

    with pytest.raises(TypeError, match="loss"):
        Partial()


def test_defaults(tmp_path):
    task = Regression()
    task.build(None)
    assert task.parameter_groups() == [{"params": task.trainable_parameters()}]
    assert task.input_tokens(task.data[0]) is None  # None: the loop counts loss()'s n
    assert task.throughput_unit == "tok"
    assert task.eval_loss() is None
    assert task.sample(3, tmp_path / "samples") is None and not (tmp_path / "samples").exists()
    assert task.extra_state() == {}
    assert task.load_extra_state({"anything": 1}) is None
    # Gradient checkpointing: the model's own switch, non-reentrant; a model without one is an error.
    with pytest.raises(UserError, match="gradient_checkpointing"):
        task.enable_gradient_checkpointing()
    calls = []

    class Checkpointable(nn.Module):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)

    task.model = Checkpointable()
    task.enable_gradient_checkpointing()
    assert calls == [{"use_reentrant": False}]


def test_a_task_with_only_the_required_methods_trains(tmp_path):
    config = TrainConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        batch_size=4,
        learning_rate=5e-2,
        schedule="constant",
        eval_every=2,
        sample_every=2,
        save_every=3,
        log_every=1,
        threads=1,
        progress_bar=False,
        tensorboard=False,
    )
    task = Regression()
    result = train(task, config)
    assert isinstance(result, TrainResult) and result.task is task
    assert (result.steps, result.total_steps, result.interrupted) == (6, 6, False)
    assert result.eval_loss is None and result.tokens == 6 * 4  # input_tokens None: n = examples
    assert result.adapter_dir == tmp_path / "run" / "adapter"
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step-6"
    assert result.checkpoints == [tmp_path / "run" / "checkpoints" / f"step-{s}" for s in (3, 6)]
    losses = [row["loss"] for row in result.history if row["loss"] is not None]
    assert len(losses) == 6 and losses[-1] < losses[0]  # it learned
    reloaded = LoraModel.from_pretrained(nn.Sequential(nn.Linear(6, 3)), result.adapter_dir)
    assert reloaded.peft_config["default"].r == 2
