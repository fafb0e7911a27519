"""A Hugging Face Trainer run killed part-way (attempt 0) resumes from its last saved checkpoint (attempt 1).

Needs ``pip install 'checkpointio[hf]'``. The model is a tiny BERT built from a config: nothing is
downloaded. Storage: ``CHECKPOINTIO_STORAGE`` or the embedded local folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from checkpointio import TaskEnvironment, ctx
from checkpointio.hf import CheckpointioTrainerCallback

env = TaskEnvironment("examples")
OUTPUT_DIR = tempfile.mkdtemp(prefix="hf-resume-")  # the Trainer's folder, shared by the attempts


class Sentences(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 32, (24, 6), generator=generator)
        self.labels = torch.randint(0, 2, (24,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


class DieOnce(TrainerCallback):
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if ctx().attempt == 0 and state.global_step == 10:
            raise RuntimeError("simulated node failure at step 10")


@env.task(retries=2)
def train() -> int:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, num_labels=2
    )
    args = TrainingArguments(
        output_dir=OUTPUT_DIR,
        max_steps=12,
        save_steps=4,  # checkpoint-4, checkpoint-8, checkpoint-12
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
    )
    saver = CheckpointioTrainerCallback(keep_last=2)  # stores output_dir at every save, in the background
    trainer = Trainer(
        model=BertForSequenceClassification(config),
        args=args,
        train_dataset=Sentences(),
        callbacks=[saver, DieOnce()],
    )
    print(f"attempt {ctx().attempt} starts from {saver.resume_from_checkpoint}")
    trainer.train(resume_from_checkpoint=saver.resume_from_checkpoint)
    return int(trainer.state.global_step)


if __name__ == "__main__":
    try:
        print(f"finished after {train()} steps")
    finally:
        shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
